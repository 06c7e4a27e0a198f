"""Every wait has a deadline (issue 24): PostgreSQL or Redis hanging, for real.

The daemon talks to the test PostgreSQL or Redis through `HangProxy`, which a test tells to
stop delivering anything, either way: the server has not gone away (no refused connection,
no reset), it just does not answer, as a paused VM or a dead network path would look.

Promises checked: while PostgreSQL hangs a send answers 503 (problem+json, Retry-After)
within its deadline instead of hanging; a pool checkout gives up after
NOTIFYD_DB_ACQUIRE_TIMEOUT; a Redis command after NOTIFYD_REDIS_TIMEOUT; `/readyz` answers
503 while either hangs and 200 after; the systemd watchdog is not fed while either hangs,
and is again after; every notification accepted (202) before, during or after is
delivered once the dependency is back, and no row is left stranded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.exceptions

from notifyd.app import Daemon
from notifyd.settings import Settings
from notifyd.store.pool import create_pool
from notifyd.systemd import SystemdNotifier
from scripts.localservers import PostgresServer, RedisServer
from tests.hangproxy import HangProxy
from tests.helpers import Api, make_settings, wait_for
from tests.test_systemd_notify import NotifyListener

DEADLINES = {
    "NOTIFYD_DB_ACQUIRE_TIMEOUT": "1",
    "NOTIFYD_DB_COMMAND_TIMEOUT": "2",
    "NOTIFYD_COMMIT_TIMEOUT": "1.5",
    "NOTIFYD_REDIS_TIMEOUT": "1.5",
    "NOTIFYD_READY_TIMEOUT": "0.5",
    # recovery within a test's patience
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "2",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}
# far more than any deadline above: a request still unanswered by then hangs
HANGING = 10.0


@pytest.fixture
async def pg_proxy(pg_server: PostgresServer) -> AsyncIterator[HangProxy]:
    async with HangProxy("127.0.0.1", pg_server.port) as proxy:
        yield proxy


@pytest.fixture
async def redis_proxy(redis_server: RedisServer) -> AsyncIterator[HangProxy]:
    async with HangProxy("127.0.0.1", redis_server.port) as proxy:
        yield proxy


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(str(tmp_path / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


async def start(
    settings: Settings, listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> Daemon:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s while all is well
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    daemon = Daemon(settings, notifier=SystemdNotifier(listener.sock.getsockname()))
    await daemon.start()
    ready = await listener.receive(timeout=10)
    assert ready.startswith("READY=1"), ready
    await listener.receive_until("WATCHDOG=1")
    return daemon


async def stop(daemon: Daemon) -> None:
    await daemon.stop()
    daemon.notifier.close()


async def send(api: Api, n: int) -> tuple[int, Any, Any]:
    async with asyncio.timeout(HANGING):
        return await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": f"user-{n}", "message": f"hi {n}"},
        )


async def readiness(api: Api) -> tuple[int, Any]:
    async with asyncio.timeout(HANGING):
        status, body, _ = await api.get("/readyz", auth=False)
    return status, body


async def watchdog_silent(listener: NotifyListener) -> None:
    """Not one WATCHDOG=1 for five watchdog periods (after what was already sent)."""
    await listener.collect_for(0.01)  # sent before the dependency hung: already on its way
    assert "WATCHDOG=1" not in await listener.collect_for(1.0)


async def all_delivered(db: asyncpg.Connection, accepted: list[str]) -> None:
    """Every accepted notification is `sent`, and so is every other row: one whose caller
    got a 503 but whose commit went through after all is delivered too, never stranded."""

    async def done() -> bool:
        rows = await db.fetch("SELECT id::text, status FROM notifications")
        stored = {row["id"]: row["status"] for row in rows}
        return set(accepted) <= set(stored) and all(s == "sent" for s in stored.values())

    await wait_for(done, timeout=30)


async def test_a_hung_postgresql_answers_503_in_time_fails_readyz_and_starves_the_watchdog(
    database_url: str,
    redis_url: str,
    pg_server: PostgresServer,
    pg_proxy: HangProxy,
    db: asyncpg.Connection,
    listener: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The promise: while PostgreSQL hangs, a send answers 503 (not a 500, not never)
    within its deadlines; /readyz says postgresql is failing; the watchdog is not fed, so
    systemd would restart the instance. Once PostgreSQL answers again all of that recovers
    and every notification accepted is delivered."""
    proxied = database_url.replace(f":{pg_server.port}/", f":{pg_proxy.port}/")
    daemon = await start(make_settings(proxied, redis_url, **DEADLINES), listener, monkeypatch)
    accepted: list[str] = []
    try:
        async with Api(daemon) as api:
            for n in range(3):
                status, body, _ = await send(api, n)
                assert status == 202, body
                accepted.append(body["notification_id"])

            pg_proxy.hang()
            started = time.monotonic()
            answers = await asyncio.gather(*(send(api, n) for n in range(3, 6)))
            waited = time.monotonic() - started
            for status, body, headers in answers:
                assert status == 503, body
                assert headers["Content-Type"].startswith("application/problem+json")
                assert body["type"] == "urn:notifyd:problem:unavailable"
                assert headers["Retry-After"] == "2"
            # deadlines: a checkout (1 s) or the group commit (1.5 s), not the hang
            assert waited < HANGING / 2, waited
            status, ready = await readiness(api)
            assert status == 503
            assert ready["checks"]["postgresql"].startswith("failing")
            assert ready["checks"]["redis"] == "ok"
            await watchdog_silent(listener)

            pg_proxy.resume()

            async def ready_again() -> bool:
                return (await readiness(api))[0] == 200

            await wait_for(ready_again, timeout=20)
            await listener.receive_until("WATCHDOG=1", timeout=10)
            for n in range(6, 9):
                status, body, _ = await send(api, n)
                assert status == 202, body
                accepted.append(body["notification_id"])
        await all_delivered(db, accepted)
    finally:
        pg_proxy.resume()
        await stop(daemon)


async def test_a_hung_redis_fails_readyz_starves_the_watchdog_and_loses_nothing_accepted(
    database_url: str,
    redis_url: str,
    redis_server: RedisServer,
    redis_proxy: HangProxy,
    db: asyncpg.Connection,
    listener: NotifyListener,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The promise: while Redis hangs, a Redis command gives up after
    NOTIFYD_REDIS_TIMEOUT (the actors' reads too, which before this blocked for good and
    kept the watchdog fed); /readyz says redis is failing; the watchdog is not fed. A send
    meanwhile answers in time (202: its row is stored, the intent waits for the sweeper;
    or 503), and once Redis is back everything accepted is delivered."""
    proxied = redis_url.replace(f":{redis_server.port}/", f":{redis_proxy.port}/")
    daemon = await start(make_settings(database_url, proxied, **DEADLINES), listener, monkeypatch)
    assert daemon.services is not None
    accepted: list[str] = []
    try:
        async with Api(daemon) as api:
            status, body, _ = await send(api, 0)
            assert status == 202, body
            accepted.append(body["notification_id"])
            await all_delivered(db, accepted)

            redis_proxy.hang()
            async with asyncio.timeout(HANGING):
                with pytest.raises(redis.exceptions.TimeoutError):
                    await daemon.services.redis.get("anything")
            answers = await asyncio.gather(*(send(api, n) for n in range(1, 4)))
            for status, body, _ in answers:
                assert status in (202, 503), body
                if status == 202:
                    accepted.append(body["notification_id"])
            status, ready = await readiness(api)
            assert status == 503
            assert ready["checks"]["redis"].startswith("failing")
            assert ready["checks"]["postgresql"] == "ok"
            await watchdog_silent(listener)

            redis_proxy.resume()

            async def ready_again() -> bool:
                return (await readiness(api))[0] == 200

            await wait_for(ready_again, timeout=30)
            await listener.receive_until("WATCHDOG=1", timeout=10)
            status, body, _ = await send(api, 4)
            assert status == 202, body
            accepted.append(body["notification_id"])
        await all_delivered(db, accepted)
    finally:
        redis_proxy.resume()
        await stop(daemon)


async def test_a_pool_checkout_gives_up_after_the_acquire_timeout(database_url: str) -> None:
    """The promise: with every connection taken (here by a caller that keeps it), the next
    checkout, and the pool's own fetchval, raise TimeoutError after
    NOTIFYD_DB_ACQUIRE_TIMEOUT instead of queueing forever."""
    settings = make_settings(
        database_url,
        "redis://127.0.0.1:1/0",
        NOTIFYD_DB_POOL_MIN="1",
        NOTIFYD_DB_POOL_MAX="1",
        NOTIFYD_DB_ACQUIRE_TIMEOUT="0.3",
    )
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as held:
            assert await held.fetchval("SELECT 1") == 1
            for attempt in (lambda: pool.fetchval("SELECT 1"), lambda: _checkout(pool)):
                async with asyncio.timeout(HANGING):
                    with pytest.raises(TimeoutError):
                        await attempt()
        assert await pool.fetchval("SELECT 2") == 2  # given back: the next one gets it
    finally:
        await pool.close()


async def _checkout(pool: asyncpg.Pool) -> None:
    async with pool.acquire():
        pass
