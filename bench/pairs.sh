#!/usr/bin/env bash
# Alternating pairs of `python -m bench all` against two builds of notifyd on this machine.
#
#   bash bench/pairs.sh OLD_TREE NEW_TREE [PAIRS] [-- bench all options…]
#
# Each tree is a checkout with its own .venv (`bash scripts/bootstrap.sh` in it; `git worktree
# add --detach /tmp/old <commit>` makes one). Runs go old, new, new, old, old, new… so that a
# machine that speeds up or slows down during the hour weighs on both builds alike. Every run
# starts on a fresh PostgreSQL and Redis (scripts/localservers.py in a temporary folder) and a
# freshly started daemon with the settings docs/benchmarks.md gives; the harness is always the
# NEW tree's, so both builds are measured by the same code. Prints one JSON line per run,
# tagged with "build" (old|new), "commit" and "run", on stdout; progress on stderr.
set -euo pipefail

die() { printf 'pairs: %s\n' "$*" >&2; exit 2; }
(($# >= 2)) || die "usage: bash bench/pairs.sh OLD_TREE NEW_TREE [PAIRS] [-- bench all options]"
old=$(cd "$1" && pwd)
new=$(cd "$2" && pwd)
shift 2
pairs=2
if (($#)) && [[ $1 != -- ]]; then pairs=$1; shift; fi
[[ ${1:-} == -- ]] && shift
for tree in "$old" "$new"; do
    [[ -x $tree/.venv/bin/notifyd ]] || die "$tree has no .venv/bin/notifyd (run scripts/bootstrap.sh there)"
done

port=${BENCH_DAEMON_PORT:-8765}
secret=bench-secret-0123456789abcdef0123456
order=()
for ((i = 0; i < pairs; i++)); do
    if ((i % 2 == 0)); then order+=(old new); else order+=(new old); fi
done

run=0
for build in "${order[@]}"; do
    run=$((run + 1))
    tree=$old
    [[ $build == new ]] && tree=$new
    commit=$(git -C "$tree" rev-parse --short HEAD)
    stack=$(mktemp -d /tmp/notifyd-pairs-XXXXXX)
    printf 'pairs: run %d/%d: %s (%s)\n' "$run" "${#order[@]}" "$build" "$commit" >&2
    eval "$(python3 "$new/scripts/localservers.py" up --dir "$stack")"
    export JWT_SECRET=$secret DATABASE_URL REDIS_URL
    "$tree/.venv/bin/notifyd" migrate >/dev/null
    (cd "$tree" && NOTIFYD_LOG_LEVEL=warning NOTIFYD_PORT=$port NOTIFYD_HOST=127.0.0.1 \
        EMAIL_HOST=127.0.0.1 EMAIL_PORT=${BENCH_SMTP_PORT:-2525} \
        NOTIFYD_SMTP_CONNECTIONS_PER_TENANT=8 \
        NOTIFYD_WS_MESSAGE_RATE=100000 NOTIFYD_WS_MESSAGE_BURST=100000 \
        exec .venv/bin/notifyd serve) >"$stack/daemon.log" 2>&1 &
    daemon=$!
    for _ in $(seq 100); do
        curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
        sleep 0.2
    done
    status=0
    (cd "$new" && .venv/bin/python -m bench all --url "http://127.0.0.1:$port" --pid "$daemon" "$@") \
        >"$stack/bench.jsonl" || status=$?
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
    python3 "$new/scripts/localservers.py" down --dir "$stack" >/dev/null 2>&1 || true
    python3 - "$build" "$commit" "$run" "$stack/bench.jsonl" <<'EOF'
import json, sys
build, commit, run, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for line in open(path, encoding="utf-8"):
    if line.strip():
        figures = json.loads(line)
        figures.update(build=build, commit=commit, run=run)
        print(json.dumps(figures), flush=True)
EOF
    ((status == 0)) || printf 'pairs: run %d ended with status %d (see %s)\n' "$run" "$status" "$stack" >&2
    ((status == 0)) && rm -rf "$stack"
done
