-- wrk script of `python -m bench rest_ingest` and of `limits` (the same load on both).
--
-- Each request POSTs an in-app notification to one of BENCH_RECIPIENTS users with the bearer
-- token of BENCH_TOKEN, to BENCH_PATH. The environment carries the token so that it never
-- appears on a command line. done() prints one line, "BENCH_JSON {...}", that the harness
-- reads: counts, latency percentiles (microseconds) and the responses that were not 2xx,
-- summed over every thread.
--
--   BENCH_TOKEN=... BENCH_PATH=/notifications/send/ BENCH_RECIPIENTS=1000 \
--   BENCH_PREFIX=bench-1234-u wrk -t1 -c32 -d10s -s bench/wrk/post.lua http://127.0.0.1:8000

local token = os.getenv("BENCH_TOKEN") or ""
local path = os.getenv("BENCH_PATH") or "/notifications/send/"
local prefix = os.getenv("BENCH_PREFIX") or "bench-user-"
local recipients = tonumber(os.getenv("BENCH_RECIPIENTS") or "1000")

local threads = {}

function setup(thread)
   thread:set("thread_id", #threads)
   table.insert(threads, thread)
end

-- per thread (each has its own Lua state); globals so that done() can read them
sent = 0
non2xx = 0
last_non2xx = 0

function init(args)
   if token == "" then
      error("BENCH_TOKEN is not set")
   end
   wrk.method = "POST"
   wrk.path = path
   wrk.headers["Authorization"] = "Bearer " .. token
   wrk.headers["Content-Type"] = "application/json"
end

function request()
   sent = sent + 1
   local body = string.format(
      '{"notification_type":"in_app","recipient":"%s%d","message":"bench %d-%d"}',
      prefix, sent % recipients, thread_id or 0, sent)
   return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      last_non2xx = status
   end
end

function done(summary, latency, requests)
   local bad, last = 0, 0
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("non2xx") or 0)
      local status = thread:get("last_non2xx") or 0
      if status ~= 0 then
         last = status
      end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"last_non2xx":%d,'
         .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
         .. '"p50_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, bad, last,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max, latency.mean))
end
