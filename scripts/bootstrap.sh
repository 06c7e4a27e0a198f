#!/usr/bin/env bash
# Bootstrap a notifyd development machine (Debian/Ubuntu). Run from the repository root.
#
# Idempotent and minimal: installs only what is missing.
#   1. OS packages `postgresql`, `redis-server`, `rabbitmq-server`, `wrk`, `chromium`, and
#      Java 17 with Maven, only those whose binaries are absent (wrk is the load generator
#      bench/ prefers, and tests/test_bench.py skips its wrk cases without it; chromium is the
#      browser the web components' tests drive through Playwright, never a Playwright browser
#      download; Java and Maven fetch and run a real Kafka broker from Maven Central's jars,
#      scripts/kafka.py, for tests/kafka_server.py and `NOTIFYD_DEV_KAFKA=1 bash scripts/dev`;
#      tests and the dev stack run private server instances via scripts/localservers.py and
#      tests/rabbitmq_server.py; any system PostgreSQL/Redis the packages auto-start is left
#      alone, but a system RabbitMQ just installed is stopped and disabled: nothing of
#      notifyd's uses it, and it would hold ports 5672/25672).
#   2. .venv (Python >= 3.11) with requirements.lock and an editable install of notifyd.
#      pip is skipped when .venv/.lock-stamp matches the sha256 of
#      requirements.lock + pyproject.toml, so repeat runs take about a second.
set -euo pipefail

log() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -f pyproject.toml && -f requirements.lock ]] \
    || die "run from the repository root (pyproject.toml and requirements.lock not found)"

# --- 1. OS packages ---------------------------------------------------------------------
have_pg_server() {
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

have_rabbitmq_server() {
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || command -v rabbitmq-server >/dev/null 2>&1
}

missing=()
have_pg_server || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
have_rabbitmq_server || missing+=(rabbitmq-server)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        die "${missing[*]} missing and not root (and no sudo); install them manually"
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "apt-get not found; install ${missing[*]} manually"
    log "installing OS packages: ${missing[*]}"
    "${SUDO[@]}" apt-get update -q >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q "${missing[@]}" >&2
    if [[ " ${missing[*]} " == *" rabbitmq-server "* ]]; then
        # the package starts and enables a system broker; tests run their own
        if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
            "${SUDO[@]}" systemctl disable --now rabbitmq-server.service >&2 || true
        elif command -v service >/dev/null 2>&1; then
            "${SUDO[@]}" service rabbitmq-server stop >&2 || true
        fi
    fi
else
    log "postgresql, redis-server, rabbitmq-server, wrk, chromium, java and maven already installed"
fi

# --- 2. Python virtualenv -----------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    PY=""
    for cand in python3.13 python3.12 python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 \
            && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            PY=$cand
            break
        fi
    done
    [[ -n $PY ]] || die "Python >= 3.11 is required (found: $(python3 --version 2>&1 || echo none))"
    log "creating .venv with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv .venv || die "'$PY -m venv' failed (on Debian: apt-get install python3-venv)"
fi

stamp=.venv/.lock-stamp
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    log ".venv is up to date"
else
    log "installing Python dependencies into .venv"
    # pip's own chatter (index warnings, build-backend notices) goes to a log, shown on failure
    if ! { .venv/bin/pip install -q -r requirements.lock \
        && .venv/bin/pip install -q --no-deps -e .; } >.venv/pip.log 2>&1; then
        tail -n 40 .venv/pip.log >&2
        die "pip install failed (full log: .venv/pip.log)"
    fi
    printf '%s\n' "$want" >"$stamp"
fi

log "done. Start local servers with: eval \"\$(python3 scripts/localservers.py up --dir .local)\""
