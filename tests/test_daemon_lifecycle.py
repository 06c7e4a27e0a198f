"""The real `notifyd serve` process: graceful shutdown, startup failures, and its logs.

Promises (DESIGN.md "Shutdown on SIGTERM/SIGINT"): stop accepting, finish in-flight work,
exit 0 within a bound; a second signal forces exit. A 2xx means the row is in PostgreSQL.
Secrets are never logged; logs are structured lines carrying the request id.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.keys import Keys
from notifyd.payloads import NotificationIntent
from notifyd.settings import Settings
from scripts.localservers import free_port
from tests.helpers import ROOT, base_env, make_settings, run_cli, token, wait_for

SHUTDOWN_TIMEOUT_S = 5.0  # NOTIFYD_SHUTDOWN_TIMEOUT in tests.helpers.base_env


class ServeProcess:
    """`python -m notifyd serve` as a child process, stderr captured to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["NOTIFYD_PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyd", "serve"],
            env={"PATH": os.environ.get("PATH", ""), **env},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                if self.proc.poll() is not None:
                    raise AssertionError(f"serve exited early:\n{self.output()}")
                try:
                    async with http.get(self.base + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(healthy, timeout=timeout, interval=0.05)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"serve still running after {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return code

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


ServeFactory = Callable[..., ServeProcess]


@pytest.fixture
async def serve(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """Start `notifyd serve` children on free ports; any still running are killed at teardown."""
    started: list[ServeProcess] = []

    def start(**env: str) -> ServeProcess:
        full = base_env(database_url, redis_url, NOTIFYD_PORT=str(free_port()), **env)
        process = ServeProcess(full, tmp_path / f"serve-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


async def _refused(port: int) -> bool:
    """True once nothing accepts connections on the port any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def _in_flight(http: aiohttp.ClientSession, base: str, expected: int) -> bool:
    """True once the daemon's in-flight gauge shows `expected` requests besides the scrape."""
    async with http.get(base + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("notifyd_http_requests_in_flight "):
            return float(line.split()[1]) >= expected + 1  # the scrape counts itself
    return False


async def _waiting_on_locks(conn: asyncpg.Connection, expected: int) -> bool:
    waiting = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(waiting >= expected)


def _send_body(n: int) -> dict[str, Any]:
    return {"notification_type": "in_app", "recipient": f"user-{n}", "message": f"hello {n}"}


async def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(
    serve: ServeFactory, database_url: str, redis_url: str
) -> None:
    """SIGTERM during slow requests: they all complete 202 with their rows, exit code 0."""
    process = serve()
    await process.wait_healthy()
    settings = make_settings(database_url, redis_url)
    bearer = token(settings, user="svc", role="service")
    locker = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)
    lock = locker.transaction()
    await lock.start()
    held = True
    try:
        # every insert into notifications now waits on this lock: slow requests, daemon unchanged
        await locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        async with aiohttp.ClientSession() as http:

            async def send(n: int) -> tuple[int, Any]:
                async with http.post(
                    process.base + "/notifications/send/",
                    json=_send_body(n),
                    headers={"Authorization": f"Bearer {bearer}"},
                ) as response:
                    return response.status, await response.json(content_type=None)

            requests = [asyncio.create_task(send(n)) for n in range(3)]
            # concurrent sends share transactions (group commit): however they were batched,
            # all three are in the daemon and a write of theirs waits on the lock
            await wait_for(lambda: _in_flight(http, process.base, 3), timeout=10)
            await wait_for(lambda: _waiting_on_locks(observer, 1), timeout=10)
            assert not any(task.done() for task in requests)

            process.signal(signal.SIGTERM)
            await wait_for(lambda: _refused(process.port), timeout=5)
            # still shutting down: the requests hold it open
            assert process.proc.poll() is None
            assert not any(task.done() for task in requests)

            await lock.commit()
            held = False
            results = await asyncio.wait_for(asyncio.gather(*requests), timeout=10)
        assert [status for status, _ in results] == [202, 202, 202], results
        code = await process.wait_exit(timeout=SHUTDOWN_TIMEOUT_S + 5)
        assert code == 0, process.output()
        ids = sorted(body["notification_id"] for _, body in results)
        stored = await observer.fetch(
            "SELECT id::text, status FROM notifications ORDER BY id::text"
        )
        assert [row["id"] for row in stored] == ids
        # and handed on before the exit: dispatched by the process itself (the shutdown waits
        # for that), or their intents on the stream; Redis and PostgreSQL stayed open until
        # the in-flight requests and their dispatch finished
        redis = Redis.from_url(redis_url)
        try:
            entries = await redis.xrange(Keys(settings.redis_prefix).intents)
        finally:
            await redis.aclose()
        enqueued = {NotificationIntent.from_fields(fields).notification_id for _, fields in entries}
        not_delivered = {row["id"] for row in stored if row["status"] != "sent"}
        # in-app: delivered in full before the exit, or on the stream for whoever comes next
        assert not_delivered <= enqueued, (stored, enqueued)
    finally:
        if held:  # a failure before the release
            await lock.rollback()
        await locker.close()
        await observer.close()


async def test_second_signal_during_a_hung_shutdown_forces_exit(
    serve: ServeFactory, database_url: str, redis_url: str
) -> None:
    """A request stuck on a lock keeps shutdown waiting; a second SIGINT exits at once."""
    process = serve(NOTIFYD_SHUTDOWN_TIMEOUT="60")
    await process.wait_healthy()
    bearer = token(make_settings(database_url, redis_url), user="svc", role="service")
    locker = await asyncpg.connect(database_url)
    observer = await asyncpg.connect(database_url)
    lock = locker.transaction()
    await lock.start()
    try:
        await locker.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        async with aiohttp.ClientSession() as http:

            async def send() -> int:
                async with http.post(
                    process.base + "/notifications/send/",
                    json=_send_body(1),
                    headers={"Authorization": f"Bearer {bearer}"},
                ) as response:
                    return response.status

            request = asyncio.create_task(send())
            await wait_for(lambda: _waiting_on_locks(observer, 1), timeout=10)
            process.signal(signal.SIGTERM)
            await wait_for(lambda: _refused(process.port), timeout=5)
            assert process.proc.poll() is None  # hung on the in-flight request
            forced_at = time.monotonic()
            process.signal(signal.SIGINT)
            code = await process.wait_exit(timeout=5)
            assert time.monotonic() - forced_at < 5
            assert code != 0, process.output()
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(request, timeout=5)
    finally:
        await lock.rollback()
        await locker.close()
        await observer.close()


def test_startup_with_unreachable_redis_exits_nonzero_with_a_clear_message(
    database_url: str,
) -> None:
    closed = free_port()  # nothing listens there
    env = base_env(
        database_url,
        f"redis://127.0.0.1:{closed}/0",
        NOTIFYD_PORT=str(free_port()),
        NOTIFYD_LOG_FORMAT="text",
    )
    started = time.monotonic()
    result = run_cli("serve", env=env, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "Redis" in result.stderr, result.stderr
    assert "cannot" in result.stderr.lower(), result.stderr
    assert "Traceback" not in result.stderr, result.stderr


async def test_json_logs_carry_request_ids_and_never_the_token_or_message_body(
    serve: ServeFactory, database_url: str, redis_url: str
) -> None:
    process = serve(NOTIFYD_LOG_FORMAT="json")
    await process.wait_healthy()
    bearer = token(make_settings(database_url, redis_url), user="svc", role="service")
    body_text = "Your interview with ACME is confirmed zq7x"
    subject_text = "Private subject line kk3p"
    request_ids: list[str] = []
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {bearer}"}
        async with http.post(
            process.base + "/notifications/send/",
            json={
                "notification_type": "email",
                "recipient": "candidate@example.com",
                "subject": subject_text,
                "message": body_text,
            },
            headers=headers,
        ) as response:
            assert response.status == 202, await response.text()
            request_ids.append(response.headers["X-Request-ID"])
        # an error path too: a bad token is echoed nowhere
        forged = bearer[:-4] + ("AAAA" if not bearer.endswith("AAAA") else "BBBB")
        async with http.get(
            process.base + "/notifications/", headers={"Authorization": f"Bearer {forged}"}
        ) as response:
            assert response.status == 401
            request_ids.append(response.headers["X-Request-ID"])
    process.signal(signal.SIGTERM)
    assert await process.wait_exit(timeout=SHUTDOWN_TIMEOUT_S + 5) == 0
    output = process.output()
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    assert all({"ts", "level", "event"} <= record.keys() for record in records)
    request_lines = [r for r in records if r["event"] == "request"]
    assert len(request_lines) >= 2
    assert all(r.get("request_id") for r in request_lines)
    logged_ids = {r["request_id"] for r in request_lines}
    assert set(request_ids) <= logged_ids
    sent = next(r for r in request_lines if r["request_id"] == request_ids[0])
    assert (sent["status"], sent["route"]) == (202, "/notifications/send/")
    for secret in (bearer, bearer.rsplit(".", 1)[1], forged, body_text, subject_text):
        assert secret not in output


class SlowToStop:
    """An actor with last work to finish after stop is asked (say, a send in progress)."""

    name = "slowstop"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stopping.set()
        await self.release.wait()


async def test_shutdown_stops_accepting_before_waiting_for_actors(settings: Settings) -> None:
    """Stop accepting comes first: an actor finishing its last work must not keep the port open."""
    actor = SlowToStop()
    daemon = Daemon(settings, extra_actors=[actor])
    await daemon.start()
    stopping = asyncio.create_task(daemon.stop())
    try:
        await asyncio.wait_for(actor.stopping.wait(), timeout=5)
        await wait_for(lambda: _refused(daemon.port), timeout=2)
    finally:
        actor.release.set()
        await asyncio.wait_for(stopping, timeout=15)
