"""Chaos: the real `notifyd serve` process is `kill -9`ed in the middle of a burst of sends.

Promises (DESIGN.md "Promises", issue 10 "chaos"):
- Nothing accepted is lost: every POST answered 202 ends `sent` in PostgreSQL and reaches the
  SMTP server, across a SIGKILL and a restart.
- At-least-once inside, idempotent at the edges: a POST retried with its `Idempotency-Key`
  (its first attempt may or may not have been accepted before the kill) makes one notification,
  never two; a message reaches the SMTP server twice only when it was in flight at the kill,
  so the duplicates are at most the email sender's concurrency.

The restarted process keeps the same environment, NOTIFYD_INSTANCE_NAME included (unset): each
process then names its consumers `<host>-<pid>`, as a systemd restart does in production, so
the dead process's pending entries are recovered by the real take-over path (XAUTOCLAIM after
NOTIFYD_CLAIM_IDLE, the row lease in PostgreSQL, the sweeper) rather than by re-reading the
same consumer's own backlog.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import ROOT, Api, base_env, make_settings, token, wait_for
from tests.smtp_sink import SmtpSink

BURST = 1000
CLIENT_CONCURRENCY = 32
EMAIL_CONCURRENCY = 8  # NOTIFYD_EMAIL_CONCURRENCY: the bound on duplicates
KILL_AT_RECEIVED = 300  # SIGKILL once the SMTP server has this many messages
POST_LEAD = 250  # before the kill, accepted-but-not-yet-received stays below this
CLIENT_RETRY_PAUSE_S = 0.05  # the client's pause before retrying a failed POST
TENANT = "TEN-CHAOS"

# Fast recovery: a dead process's leases, pending entries and stranded rows come back in
# seconds, not minutes. send_timeout < claim_idle, as settings.validate requires.
FAST_RECOVERY = {
    "NOTIFYD_CLAIM_IDLE": "3",
    "NOTIFYD_SEND_TIMEOUT": "2",
    "NOTIFYD_REQUEUE_AFTER": "2",
    "NOTIFYD_SWEEP_INTERVAL": "0.5",
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_EMAIL_CONCURRENCY": str(EMAIL_CONCURRENCY),
    # a request killed half way leaves its Idempotency-Key claimed; the retry may take it over
    # after this bound (default 60 s) instead of being answered 409 for a minute
    "NOTIFYD_IDEMPOTENCY_STALE_AFTER": "3",
    "NOTIFYD_DB_POOL_MAX": "10",
    "NOTIFYD_LOG_LEVEL": "warning",
    "NOTIFYD_LOG_FORMAT": "text",
}


class ServeProcess:
    """`python -m notifyd serve` as a child process, its output captured to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyd", "serve"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def sigkill(self) -> None:
        """`kill -9`: no shutdown code runs, in-flight requests and sends die mid-way."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        self.sigkill()
        self._log.close()


@dataclass
class Cluster:
    """The daemon under test: one process at a time on a fixed port, restartable."""

    env: dict[str, str]
    port: int
    tmp_path: Path
    processes: list[ServeProcess]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def current(self) -> ServeProcess:
        return self.processes[-1]

    def start(self) -> ServeProcess:
        process = ServeProcess(self.env, self.tmp_path / f"serve-{len(self.processes)}.log")
        self.processes.append(process)
        return process

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                process = self.current
                if process.proc.poll() is not None:
                    raise AssertionError(f"serve exited early:\n{process.output()}")
                try:
                    async with http.get(self.base + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(healthy, timeout=timeout, interval=0.05)

    def logs(self) -> str:
        return "\n".join(
            f"--- serve-{n} (exit code {p.proc.poll()}) ---\n{p.output()[-6000:]}"
            for n, p in enumerate(self.processes)
        )


@pytest.fixture
def cluster(
    database_url: str, redis_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> Iterator[Cluster]:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        **base_env(
            database_url,
            redis_url,
            NOTIFYD_PORT=str(port),
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(smtp_sink.port),
            **FAST_RECOVERY,
        ),
    }
    cluster = Cluster(env, port, tmp_path, [])
    try:
        yield cluster
    finally:
        for process in cluster.processes:
            process.close()


@dataclass
class ClientStats:
    answered: int = 0
    connection_errors: int = 0
    in_progress_409: int = 0
    replayed: int = 0
    keys_answered_409: set[str] = field(default_factory=set)


def _send_body(i: int) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "recipient": f"candidate{i:04d}@example.com",
        "subject": f"Chaos {i:04d}",
        "message": f"Burst message number {i}.",
    }


async def _post_until_accepted(
    http: aiohttp.ClientSession,
    base: str,
    bearer: str,
    i: int,
    stats: ClientStats,
    deadline: float,
) -> str:
    """POST one send until it is answered 202; retries reuse its Idempotency-Key."""
    key = f"chaos-{i:04d}"
    headers = {
        "Authorization": f"Bearer {bearer}",
        "Idempotency-Key": key,
        "Content-Type": "application/json",
    }
    body = orjson.dumps(_send_body(i))
    while True:
        try:
            async with http.post(f"{base}/notifications/send/", data=body, headers=headers) as r:
                raw = await r.read()
                if r.status == 202:
                    stats.answered += 1
                    if r.headers.get("Idempotent-Replayed") == "true":
                        stats.replayed += 1
                    notification_id: str = orjson.loads(raw)["notification_id"]
                    return notification_id
                if r.status != 409:  # 409: the key's first request died with the process
                    raise AssertionError(f"POST {i}: {r.status} {raw[:500]!r}")
                stats.in_progress_409 += 1
                stats.keys_answered_409.add(key)
        except (aiohttp.ClientConnectionError, TimeoutError):
            stats.connection_errors += 1  # the daemon was killed or is restarting: retry
        if time.monotonic() > deadline:
            raise AssertionError(f"POST {i} never accepted")
        await asyncio.sleep(CLIENT_RETRY_PAUSE_S)


@pytest.mark.timeout(300)
async def test_kill_9_mid_burst_loses_nothing_and_duplicates_at_most_in_flight_sends(
    cluster: Cluster,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    database_url: str,
    redis_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Nothing accepted is lost; idempotent at the edges; duplicates ≤ the sender's concurrency.

    1,000 email sends from 32 concurrent clients; SIGKILL mid-way, restart with the same
    environment, keep posting. Every 202 ends `sent` and reaches the SMTP server; rows == 1,000.
    """
    settings = make_settings(database_url, redis_url)
    bearer = token(settings, tenant=TENANT, user="backend", role="service", ttl=900)
    started = time.monotonic()
    cluster.start()
    await cluster.wait_healthy()

    stats = ClientStats()
    accepted: dict[int, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(BURST):
        queue.put_nowait(i)
    deadline = time.monotonic() + 120
    kill_info: dict[str, Any] = {}

    killed = asyncio.Event()

    async def not_too_far_ahead() -> bool:
        return killed.is_set() or stats.answered - len(smtp_sink.received) < POST_LEAD

    async def client(http: aiohttp.ClientSession) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            # Until the kill, stay at most POST_LEAD accepted-but-unsent ahead of the SMTP
            # server: accepting is much faster than sending here, and the kill must find POSTs,
            # queued work and SMTP sends all in flight, not a burst that is already over.
            await wait_for(not_too_far_ahead, timeout=60, interval=0.005)
            accepted[i] = await _post_until_accepted(http, cluster.base, bearer, i, stats, deadline)

    async def chaos() -> None:
        async def time_to_kill() -> bool:
            return len(smtp_sink.received) >= KILL_AT_RECEIVED

        await wait_for(time_to_kill, timeout=60, interval=0.005)
        victim = cluster.current
        kill_info.update(
            answered=stats.answered,
            received=len(smtp_sink.received),
            at_s=round(time.monotonic() - started, 2),
        )
        victim.sigkill()  # kill -9
        killed.set()
        kill_info["exit_code"] = victim.proc.returncode
        cluster.start()  # same environment, same port
        await cluster.wait_healthy()
        kill_info["restarted_after_s"] = round(time.monotonic() - started - kill_info["at_s"], 2)

    timeout = aiohttp.ClientTimeout(total=15)
    connector = aiohttp.TCPConnector(limit=CLIENT_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(chaos(), *(client(http) for _ in range(CLIENT_CONCURRENCY)))
    posted_s = time.monotonic() - started

    assert kill_info["exit_code"] == -9
    assert kill_info["answered"] < BURST, "the kill came after the burst: nothing was tested"
    assert len(accepted) == BURST
    ids = sorted(set(accepted.values()))

    # Every accepted notification ends `sent`; nothing fails for good on the way.
    async def all_sent() -> bool:
        counts = dict(
            await db.fetch(
                "SELECT status, count(*) FROM notifications WHERE id = ANY($1::uuid[]) "
                "GROUP BY status",
                ids,
            )
        )
        if counts.get("failed"):
            errors = await db.fetch(
                "SELECT id, attempts, last_error FROM notifications WHERE status = 'failed' LIMIT 5"
            )
            raise AssertionError(f"failed deliveries: {errors}\n{cluster.logs()}")
        return counts.get("sent", 0) == len(ids)

    try:
        await wait_for(all_sent, timeout=90, interval=0.1)
    except AssertionError:
        rows = await db.fetch(
            "SELECT status, count(*) FROM notifications GROUP BY status ORDER BY status"
        )
        raise AssertionError(f"not all sent: {rows}\n{cluster.logs()}") from None
    done_s = time.monotonic() - started

    # Each of them reached the SMTP server (a 250 comes before the row is marked sent).
    received = Counter(r.notifyd_id for r in smtp_sink.received)
    missing = [i for i in ids if received[i] == 0]
    assert not missing, f"{len(missing)} accepted notifications never reached SMTP: {missing[:5]}"
    duplicates = sum(count - 1 for count in received.values() if count > 1)
    duplicated_ids = sum(1 for count in received.values() if count > 1)

    rows = await db.fetchval("SELECT count(*) FROM notifications WHERE tenant_id = $1", TENANT)
    extra = await db.fetch(
        "SELECT idempotency_key, count(*) AS n FROM notifications "
        "GROUP BY idempotency_key HAVING count(*) > 1 ORDER BY idempotency_key"
    )
    strangers = sorted(set(received) - set(ids))

    summary = {
        "duplicates": duplicates,
        "duplicated_ids": duplicated_ids,
        "smtp_messages": len(smtp_sink.received),
        "rows": rows,
        "keys_with_several_rows": len(extra),
        "client_connection_errors": stats.connection_errors,
        "client_409_in_progress": stats.in_progress_409,
        "client_replayed_202": stats.replayed,
        "kill": kill_info,
        "posted_s": round(posted_s, 2),
        "all_sent_s": round(done_s, 2),
    }
    print(f"\nchaos: {duplicates} duplicate SMTP deliveries (bound {EMAIL_CONCURRENCY}); {summary}")
    for name, value in summary.items():
        record_property(f"chaos_{name}", value)

    assert duplicates <= EMAIL_CONCURRENCY, summary

    # Idempotent at the edges: a retried POST never makes a second notification.
    assert rows == BURST, f"{rows} rows for {BURST} keys; doubled keys: {extra[:5]}; {summary}"
    assert not strangers, f"SMTP got notifications nobody was answered with: {strangers[:5]}"


async def test_a_write_and_its_idempotent_answer_commit_in_one_transaction(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Idempotent at the edges, `kill -9` at any moment: there is no moment between the
    notification's COMMIT and the recording of its answer, because both rows are written by
    the same transaction (same `xmin`). A client retrying after a kill either finds nothing
    (and writes once) or the recorded answer (and gets it replayed)."""
    daemon = await daemon_factory()
    body = _send_body(1)
    key = "killed-mid-request"
    async with Api(daemon) as api:
        status, first, _ = await api.post(
            "/notifications/send/",
            body,
            tenant=TENANT,
            user="backend",
            role="service",
            headers={"Idempotency-Key": key},
        )
        assert status == 202, first
        status, again, headers = await api.post(
            "/notifications/send/",
            body,
            tenant=TENANT,
            user="backend",
            role="service",
            headers={"Idempotency-Key": key},
        )
    assert (status, again) == (202, first)
    assert headers["Idempotent-Replayed"] == "true"
    # the notification row itself moves on (the pipeline updates it); its audit row, written
    # by the same transaction, does not
    row_xmin = await db.fetchval(
        "SELECT xmin::text FROM audit_log "
        "WHERE tenant_id = $1 AND details->>'notification_id' = $2",
        TENANT,
        first["notification_id"],
    )
    key_xmin = await db.fetchval(
        "SELECT xmin::text FROM idempotency_keys WHERE tenant_id = $1 AND key = $2", TENANT, key
    )
    assert row_xmin is not None
    assert row_xmin == key_xmin
