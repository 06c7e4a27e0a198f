// Shared by <notifyd-inbox> and <notifyd-chat> (GET /ui/notifyd-core.js): the token, REST
// calls and one WebSocket with backoff, `?since=` resume and the refresh frame. notifyd serves
// the components with this import pinned to its version (notifyd/ui/__init__.py).

/** Delay before reconnect attempt `n` (0-based): full jitter over a capped exponential. */
export function backoff(n, base = 250, cap = 15000) {
  return Math.random() * Math.min(cap, base * 2 ** n);
}

/** Seconds since the epoch at which a JWT expires (its `exp`), or null when unreadable. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

/** The shared connection logic of both components: the token, REST calls and the socket
 * with backoff, `?since=` resume and the refresh frame. */
export class Connection {
  constructor(host, path, onFrame, onState) {
    this.host = host; // the element: base-url and tokenProvider are read from it
    this.path = path;
    this.onFrame = onFrame;
    this.onState = onState;
    this.token = null;
    this.ws = null;
    this.since = null; // the offset of the last event seen
    this.attempts = 0;
    this.stopped = false;
    this.timer = null;
    this.refreshTimer = null;
  }

  base() {
    return (this.host.getAttribute("base-url") || location.origin).replace(/\/+$/, "");
  }

  async freshToken() {
    const provider = this.host.tokenProvider;
    if (typeof provider !== "function") throw new Error("tokenProvider is not set");
    const token = await provider();
    if (typeof token !== "string" || !token) throw new Error("tokenProvider returned no token");
    this.token = token;
    this.scheduleRefresh();
    return token;
  }

  /** Asks for a new token before this one expires (the server also warns: token_expiring). */
  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    const exp = tokenExpiry(this.token);
    if (exp === null || this.stopped) return;
    const left = exp * 1000 - Date.now();
    const at = Math.max(1000, Math.min(left - 30000, left / 2));
    this.refreshTimer = setTimeout(() => this.refresh().catch(() => {}), at);
  }

  async refresh() {
    const token = await this.freshToken();
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "refresh", token }));
    }
  }

  /** A REST call with the current token; on 401 one retry with a fresh one. */
  async fetch(path, init = {}) {
    if (!this.token) await this.freshToken();
    const url = path.startsWith("http") ? path : this.base() + path;
    const call = () =>
      fetch(url, {
        ...init,
        headers: { ...(init.headers || {}), Authorization: `Bearer ${this.token}` },
      });
    let response = await call();
    if (response.status === 401) {
      await this.freshToken();
      response = await call();
    }
    return response;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearTimeout(this.refreshTimer);
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  async connect() {
    if (this.stopped) return;
    try {
      if (!this.token || (tokenExpiry(this.token) ?? Infinity) * 1000 < Date.now() + 5000) {
        await this.freshToken();
      }
    } catch (error) {
      this.onState("offline", error);
      this.retry();
      return;
    }
    const url = new URL(this.base() + this.path);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const resumed = this.since !== null;
    if (resumed) url.searchParams.set("since", this.since);
    const ws = new WebSocket(url, ["bearer", this.token]);
    this.ws = ws;
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (typeof frame.offset === "string") this.since = frame.offset;
      if (frame.type === "token_expiring") {
        this.refresh().catch(() => {});
        return;
      }
      this.onFrame(frame, resumed);
    };
    ws.onopen = () => this.onState("open");
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.stopped) return;
      if (event.code === 4003 || event.code === 4004) {
        this.onState("refused", event.reason);
        return;
      }
      if (event.code === 4001) this.token = null; // a fresh one before the next attempt
      this.onState("offline");
      this.retry();
    };
  }

  /** Called by the component once the server says the socket is caught up. */
  settled() {
    this.attempts = 0;
  }

  retry() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), backoff(this.attempts++));
  }
}

/** The `next` URL of a `Link` header, or null. */
export function nextLink(header) {
  if (!header) return null;
  for (const part of header.split(",")) {
    const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
    if (match) return match[1];
  }
  return null;
}

const UNITS = [
  ["year", 31536000],
  ["month", 2592000],
  ["week", 604800],
  ["day", 86400],
  ["hour", 3600],
  ["minute", 60],
  ["second", 1],
];

const formats = new Map(); // locale → Intl.RelativeTimeFormat (made once: not cheap)

export function relativeTime(iso, locale) {
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  let format = formats.get(locale || "");
  if (!format) {
    format = new Intl.RelativeTimeFormat(locale || undefined, { numeric: "auto" });
    formats.set(locale || "", format);
  }
  for (const [unit, size] of UNITS) {
    if (Math.abs(seconds) >= size || unit === "second") {
      return format.format(Math.round(seconds / size), unit);
    }
  }
  return "";
}

/** The language of `locale` (or the browser's) that `table` has strings for, else English. */
export function pickStrings(table, locale) {
  const lang = (locale || navigator.language || "en").toLowerCase().split("-")[0];
  return table[lang] || table.en;
}
