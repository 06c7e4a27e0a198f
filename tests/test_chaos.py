"""Chaos: the real `notifyd serve` process is `kill -9`ed with work in flight.

Promises (DESIGN.md "Promises", issues 10 "chaos" and 25):
- Nothing accepted is lost: every POST answered 202 ends `sent` in PostgreSQL and reaches the
  SMTP server (or the user's feed), across a SIGKILL and a restart: on the keyed path (own
  transaction, then XADD) and on the usual one (no key: the outbox's group commit, then the
  accepting process's own dispatcher), where the kill strands whole batches that no stream
  names and only the sweeper can find. Each kill test checks that work was in flight.
- At-least-once inside, idempotent at the edges: a POST retried with its `Idempotency-Key`
  (its first attempt may or may not have been accepted before the kill) makes one notification,
  never two; a message reaches the SMTP server twice only when the relay had taken it and the
  row was still `sending` at the kill.
- An ingested event is acknowledged only after its rows commit: killed before the commit it
  is read again and delivered; killed between the commit and the XACK it is read again and
  its dedupe row makes that reading store nothing.

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
from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.payloads import NotificationIntent
from notifyd.settings import load_settings
from scripts.localservers import RedisServer, free_port
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
async def _wait_all_sent(
    db: asyncpg.Connection, cluster: Cluster, ids: list[str], timeout: float, context: str = ""
) -> None:
    """Waits until every notification of `ids` is `sent`. A `failed` one fails the test at
    once (nothing may fail for good on the way); the timeout fails it with the counts by
    status, `context`, and the cluster's logs."""

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
            raise AssertionError(f"failed deliveries: {counts}, {errors}\n{cluster.logs()}")
        return counts.get("sent", 0) == len(ids)

    try:
        await wait_for(all_sent, timeout=timeout, interval=0.1)
    except AssertionError:
        rows = await db.fetch(
            "SELECT status, count(*) FROM notifications GROUP BY status ORDER BY status"
        )
        raise AssertionError(f"not all sent: {rows}{context}\n{cluster.logs()}") from None


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
    sending_at_kill: set[str] = set()

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
        rows = await db.fetch(
            "SELECT id::text, status FROM notifications WHERE tenant_id = $1", TENANT
        )
        kill_info["statuses"] = dict(Counter(r["status"] for r in rows))
        sending_at_kill.update(r["id"] for r in rows if r["status"] == "sending")
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
    in_flight = sum(kill_info["statuses"].get(s, 0) for s in ("queued", "dispatched", "sending"))
    assert in_flight > 0, f"nothing was in flight at the kill: {kill_info}"
    assert len(accepted) == BURST
    ids = sorted(set(accepted.values()))

    # Every accepted notification ends `sent`; nothing fails for good on the way.
    await _wait_all_sent(db, cluster, ids, timeout=90)
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
    # a second copy only of a message the relay had taken when the process died
    assert {i for i, count in received.items() if count > 1} <= sending_at_kill, summary

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


# --- the usual path: REST sends without an Idempotency-Key, group-committed by the outbox and
# dispatched in the accepting process (`Dispatcher.dispatch_now`), killed mid-burst

UNKEYED_BURST = 240  # half email, half in-app
UNKEYED_TENANT = "TEN-OUTBOX"
UNKEYED_CLIENTS = 16
FLOWING_AT = 80  # answers before the dispatch is held: the whole pipeline is moving by then
HELD_AFTER = 40  # answers after it: whole outbox batches committed, none dispatched
RELAY_DELAY_S = 0.25  # a slow relay, so emails are still being sent at the kill
FEED_USERS = 10


def _unkeyed_body(i: int) -> dict[str, Any]:
    if i % 2:
        return {
            "notification_type": "in_app",
            "recipient": f"user-{i % FEED_USERS}",
            "message": f"In-app {i:04d}",
        }
    return {
        "notification_type": "email",
        "recipient": f"candidate{i:04d}@example.com",
        "subject": f"Outbox {i:04d}",
        "message": f"Burst message number {i}.",
    }


@dataclass
class Snapshot:
    """The tenant's rows as the kill left them, read from PostgreSQL."""

    by_status: Counter[str]
    sending: set[str]
    stranded: set[str]  # `queued` with no intent on the stream: only the sweeper has them


async def _snapshot(db: asyncpg.Connection, redis: Redis) -> Snapshot:
    rows = await db.fetch(
        "SELECT id::text, status FROM notifications WHERE tenant_id = $1", UNKEYED_TENANT
    )
    entries: Any = await redis.xrange("notifyd:intents")
    on_stream = {NotificationIntent.from_fields(f).notification_id for _, f in entries}
    return Snapshot(
        Counter(r["status"] for r in rows),
        {r["id"] for r in rows if r["status"] == "sending"},
        {r["id"] for r in rows if r["status"] == "queued" and r["id"] not in on_stream},
    )


@pytest.mark.timeout(180)
async def test_kill_9_mid_burst_of_unkeyed_sends_delivers_every_accepted_notification(
    cluster: Cluster,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    database_url: str,
    redis_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Nothing accepted is lost, on the path production takes: REST sends without an
    `Idempotency-Key` (the outbox's group commit, then this process's dispatcher, no intent
    on any stream). Email through a slow SMTP relay and in-app, `kill -9` mid-burst.

    To make sure the kill strands whole outbox batches, the test holds the dispatch for a
    moment before it (a lock on `preferences`, which every dispatch reads): requests are
    still answered 202, their rows stay `queued`, and nothing in Redis names them. The kill
    comes while those rows, a backlog of `dispatched` emails and emails at the relay
    (`sending`) are all in flight. After a restart every 2xx-answered notification ends
    `sent`: the emails arrive, the in-app events are on the users' feeds. An email arrives
    twice only if the kill fell between the relay's 250 and the row's update: at most the
    rows `sending` at the kill.
    """
    settings = make_settings(database_url, redis_url)
    bearer = token(settings, tenant=UNKEYED_TENANT, user="backend", role="service", ttl=900)
    smtp_sink.delay = RELAY_DELAY_S
    # the held dispatch must not time out (and fall back to the stream) before the kill
    cluster.env["NOTIFYD_DB_COMMAND_TIMEOUT"] = "60"
    cluster.start()
    await cluster.wait_healthy()

    accepted: dict[int, str] = {}
    unanswered: list[int] = []
    killed = asyncio.Event()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(UNKEYED_BURST):
        queue.put_nowait(i)
    headers = {"Authorization": f"Bearer {bearer}", "Content-Type": "application/json"}

    # the burst is let out in three parts: the pipeline flowing, the dispatch held, the rest
    # (in flight at the kill)
    budget = [FLOWING_AT]

    async def client(http: aiohttp.ClientSession) -> None:
        while not killed.is_set():
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await wait_for(lambda n=i: killed.is_set() or n < budget[0], timeout=120, interval=0.01)
            if killed.is_set():
                return
            body = orjson.dumps(_unkeyed_body(i))
            try:
                async with http.post(
                    f"{cluster.base}/notifications/send/", data=body, headers=headers
                ) as r:
                    raw = await r.read()
                    assert r.status == 202, f"POST {i}: {r.status} {raw[:300]!r}"
                    accepted[i] = orjson.loads(raw)["notification_id"]
            except (aiohttp.ClientConnectionError, TimeoutError):
                unanswered.append(i)  # no key: a retry would be a new notification

    async def answered(count: int) -> bool:
        return len(accepted) >= count

    hold = db.transaction()
    held = False
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=UNKEYED_CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(UNKEYED_CLIENTS)]
        try:
            await wait_for(lambda: answered(FLOWING_AT), timeout=60)
            await wait_for(lambda: len(smtp_sink.received) > 0, timeout=30)
            await hold.start()
            held = True
            await db.execute("LOCK TABLE preferences IN ACCESS EXCLUSIVE MODE")
            budget[0] = FLOWING_AT + HELD_AFTER
            await wait_for(lambda: answered(FLOWING_AT + HELD_AFTER), timeout=60)
            budget[0] = UNKEYED_BURST
            await wait_for(lambda: answered(FLOWING_AT + HELD_AFTER + 1), timeout=60)
            cluster.current.sigkill()  # kill -9, sends still arriving
            killed.set()
            at_kill = await _snapshot(db, redis)
        finally:
            if held:
                await hold.rollback()
            killed.set()
            await asyncio.gather(*clients)
    assert cluster.current.proc.returncode == -9
    assert len(accepted) < UNKEYED_BURST, "the burst was over before the kill: nothing tested"
    in_flight = sum(at_kill.by_status[s] for s in ("queued", "dispatched", "sending"))
    assert in_flight > 0, f"nothing was in flight at the kill: {at_kill.by_status}"
    assert at_kill.stranded, f"no outbox batch was stranded by the kill: {at_kill.by_status}"

    cluster.start()  # same environment, same port
    await cluster.wait_healthy()
    ids = sorted(accepted.values())

    await _wait_all_sent(db, cluster, ids, timeout=60, context=f"; at the kill {at_kill.by_status}")

    emails = {accepted[i] for i in accepted if i % 2 == 0}
    in_app = {i: accepted[i] for i in accepted if i % 2}
    await asyncio.to_thread(smtp_sink.wait_for, len(emails), 30)
    received = Counter(r.notifyd_id for r in smtp_sink.received)
    missing = emails - set(received)
    assert not missing, f"{len(missing)} accepted emails never reached SMTP: {sorted(missing)[:5]}"
    # a POST cut off by the kill may have committed without an answer: delivered too, but
    # nothing reaches SMTP that the tenant never asked for
    tenant_ids = {
        r["id"]
        for r in await db.fetch(
            "SELECT id::text FROM notifications WHERE tenant_id = $1", UNKEYED_TENANT
        )
    }
    assert set(received) <= tenant_ids
    duplicates = sum(count - 1 for count in received.values())

    keys = Keys("notifyd")
    events: Counter[str] = Counter()
    for user in range(FEED_USERS):
        feed: Any = await redis.xrange(keys.user_history(UNKEYED_TENANT, f"user-{user}"))
        for _, fields in feed:
            events.update(
                nid for nid in in_app.values() if nid.encode() in b"".join(fields.values())
            )
    unpublished = [nid for nid in in_app.values() if not events[nid]]
    assert not unpublished, f"{len(unpublished)} in-app rows sent without their live event"
    offsets = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE id = ANY($1::uuid[]) "
        "AND provider_message_id IS NOT NULL",
        list(in_app.values()),
    )
    assert offsets == len(in_app)

    summary = {
        "accepted": len(accepted),
        "unanswered": len(unanswered),
        "at_kill": dict(at_kill.by_status),
        "stranded_batches_rows": len(at_kill.stranded),
        "email_duplicates": duplicates,
        "inapp_events_published_twice": sum(c - 1 for c in events.values()),
    }
    print(f"\nchaos (no keys): {summary}")
    for name, value in summary.items():
        record_property(f"chaos_unkeyed_{name}", value)
    # at-least-once: a second copy only of what was at the relay when the process died
    assert duplicates <= len(at_kill.sending), summary


# --- ingested events: killed between the read and the commit, and between the commit and the ACK

EVENTS = "notifyd:events"
INGEST_GROUP = "ingest"
EVENT_TENANT = "TEN-INGEST"
EVENT_TEMPLATES = {
    "email": {"subject": "Application for {{ Position }}", "text_body": "Thanks, {{ Position }}."},
    "in_app": {"text_body": "Application for {{ Position }} received"},
}
# shorter leases than the burst's: one event, nothing slow in flight
INGEST_RECOVERY = {"NOTIFYD_CLAIM_IDLE": "2", "NOTIFYD_SEND_TIMEOUT": "1"}


def _event(event_id: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "tenant_id": EVENT_TENANT,
            "type": "application.received",
            "template_key": "application_received",
            "context": {"Position": "Backend Engineer"},
            "recipients": [{"user_id": "cand-1", "email": "cand-1@example.com"}],
        }
    )


async def _ingest_cluster(cluster: Cluster, own_redis: RedisServer) -> Redis:
    """The daemon on a Redis of the test's own (whose ACL the test changes), started, with
    the tenant's templates; returns a client of that Redis."""
    cluster.env.update(REDIS_URL=own_redis.url(0), **INGEST_RECOVERY)
    cluster.start()
    await cluster.wait_healthy()
    settings = load_settings(cluster.env, dotenv_file=None)
    bearer = token(settings, tenant=EVENT_TENANT, user="admin-1", role="admin")
    async with aiohttp.ClientSession() as http:
        for channel, template in EVENT_TEMPLATES.items():
            async with http.put(
                f"{cluster.base}/templates/application_received/{channel}/",
                json=template,
                headers={"Authorization": f"Bearer {bearer}"},
            ) as response:
                assert response.status == 200, await response.text()
    return Redis.from_url(own_redis.url(0))


async def _pending(redis: Redis) -> int:
    summary: Any = await redis.xpending(EVENTS, INGEST_GROUP)
    return int(summary["pending"])


async def _event_delivered_once(
    cluster: Cluster, db: asyncpg.Connection, redis: Redis, sink: SmtpSink, event_id: str
) -> None:
    """After the restart: the entry is acknowledged (read again by the new process), the
    event has one dedupe row and one set of notifications, each delivered once."""

    async def acknowledged() -> bool:
        return await _pending(redis) == 0

    try:
        await wait_for(acknowledged, timeout=30, interval=0.1)

        async def delivered() -> bool:
            rows = await db.fetch(
                "SELECT status FROM notifications WHERE tenant_id = $1", EVENT_TENANT
            )
            return len(rows) >= 2 and all(r["status"] == "sent" for r in rows)

        await wait_for(delivered, timeout=30, interval=0.1)
    except AssertionError:
        rows = await db.fetch("SELECT channel, status, attempts FROM notifications")
        raise AssertionError(f"event not delivered: {rows}\n{cluster.logs()}") from None
    rows = await db.fetch(
        "SELECT id, channel, recipient FROM notifications WHERE tenant_id = $1 ORDER BY channel",
        EVENT_TENANT,
    )
    assert [(r["channel"], r["recipient"]) for r in rows] == [
        ("email", "cand-1@example.com"),
        ("in_app", "cand-1"),
    ], "the event's notifications were stored twice"
    dedupe = await db.fetch("SELECT event_id, notification_ids FROM ingested_events")
    assert [r["event_id"] for r in dedupe] == [event_id]
    assert sorted(dedupe[0]["notification_ids"]) == sorted(r["id"] for r in rows)
    await asyncio.to_thread(sink.wait_for, 1)
    assert [r.notifyd_id for r in sink.received] == [str(rows[0]["id"])]
    feed: Any = await redis.xrange(Keys("notifyd").user_history(EVENT_TENANT, "cand-1"))
    assert any(str(rows[1]["id"]).encode() in b"".join(f.values()) for _, f in feed)


@pytest.mark.timeout(120)
async def test_an_event_killed_before_its_commit_is_read_again_and_delivered(
    cluster: Cluster, own_redis: RedisServer, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Nothing accepted is lost: an event read from `notifyd:events` is acknowledged only
    after its rows commit. Here the process is killed while its transaction waits: the test
    holds the event's dedupe key (an uncommitted row in `ingested_events`, rolled back after
    the kill), so the daemon's INSERT blocks on it. The entry is still pending at the kill,
    and the restarted process takes it over and delivers the event."""
    redis = await _ingest_cluster(cluster, own_redis)
    event_id = "evt-before-commit"
    try:
        holder = db.transaction()
        await holder.start()
        try:
            await db.execute(
                "INSERT INTO ingested_events (tenant_id, event_id, event_type, source, "
                "notification_ids) VALUES ($1, $2, 'held', 'redis', '{}')",
                EVENT_TENANT,
                event_id,
            )
            xid = await db.fetchval("SELECT txid_current()::text")
            await redis.xadd(EVENTS, {"event": _event(event_id)})

            async def insert_waiting() -> bool:
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' "
                    "AND transactionid::text = $1 AND NOT granted",
                    xid,
                )
                return bool(waiting)

            await wait_for(insert_waiting, timeout=20, interval=0.05)
            cluster.current.sigkill()
        finally:
            await holder.rollback()
        # the kill fell between the read and the commit: nothing stored, nothing acknowledged
        assert await _pending(redis) == 1, "the entry was acknowledged before its commit"
        assert await db.fetchval("SELECT count(*) FROM notifications") == 0
        cluster.start()
        await cluster.wait_healthy()
        await _event_delivered_once(cluster, db, redis, smtp_sink, event_id)
    finally:
        await redis.aclose()


@pytest.mark.timeout(120)
async def test_an_event_killed_between_its_commit_and_its_ack_is_neither_lost_nor_doubled(
    cluster: Cluster, own_redis: RedisServer, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """At-least-once inside, idempotent at the edges: an event whose rows committed but
    whose XACK never happened (the process died in between) is read again after the
    restart, and its dedupe row (`ingested_events`, written in the same transaction) makes
    the second reading store nothing. The ACK is made to fail (the Redis ACL takes XACK
    away from the daemon's user), so the kill lands in that window every time. The sink
    holds its reply to the email meanwhile: a relay's 250 that had already come back would
    make the restarted process's resend the in-flight duplicate DESIGN.md allows at the SMTP
    edge, and the kill hangs up the held session, which the sink then does not keep."""
    redis = await _ingest_cluster(cluster, own_redis)
    try:
        await redis.execute_command("ACL", "SETUSER", "default", "-xack")
        smtp_sink.delay = 60.0
        try:
            await redis.xadd(EVENTS, {"event": _event("evt-after-commit")})

            async def committed() -> bool:
                return bool(await db.fetchval("SELECT count(*) FROM ingested_events"))

            await wait_for(committed, timeout=20, interval=0.05)
            cluster.current.sigkill()
        finally:
            smtp_sink.delay = 0.0
            await redis.execute_command("ACL", "SETUSER", "default", "+xack")
        assert await _pending(redis) == 1  # committed, never acknowledged
        assert await db.fetchval("SELECT count(*) FROM notifications") == 2
        cluster.start()
        await cluster.wait_healthy()
        await _event_delivered_once(cluster, db, redis, smtp_sink, "evt-after-commit")
    finally:
        await redis.aclose()
