"""sd_notify over a real `$NOTIFY_SOCKET`: READY=1, WATCHDOG=1 while healthy, STOPPING=1.

Promises (DESIGN.md "Shutdown" and "systemd runs it with Type=notify, watchdog"): the daemon
says READY=1 once it serves, feeds the watchdog only while every actor is healthy, says
STOPPING=1 on SIGTERM and exits 0. Without NOTIFY_SOCKET every notify is a harmless no-op.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from notifyd.app import Daemon
from notifyd.settings import Settings
from notifyd.systemd import SystemdNotifier
from scripts.localservers import free_port
from tests.helpers import ROOT, base_env


class NotifyListener:
    """The systemd side: an AF_UNIX datagram socket that collects what the daemon says."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    async def receive(self, timeout: float = 10.0) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout)
        return data.decode()

    async def receive_until(self, prefix: str, timeout: float = 10.0) -> tuple[str, list[str]]:
        """The first datagram starting with `prefix`, and every datagram before it."""
        deadline = time.monotonic() + timeout
        before: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {prefix!r} within {timeout}s; got {before}")
            try:
                message = await self.receive(remaining)
            except TimeoutError:
                raise AssertionError(f"no {prefix!r} within {timeout}s; got {before}") from None
            if message.startswith(prefix):
                return message, before
            before.append(message)

    async def collect_for(self, seconds: float) -> list[str]:
        """Everything received during a fixed window (for "nothing was sent" checks)."""
        messages: list[str] = []
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                messages.append(await self.receive(remaining))
            except TimeoutError:
                break
        return messages

    def close(self) -> None:
        self.sock.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines() if "=" in line)


@pytest.fixture
def notify_path(tmp_path: Path) -> Path:
    return tmp_path / "notify.sock"


@pytest.fixture
def listener(notify_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(str(notify_path))
    try:
        yield sock
    finally:
        sock.close()


def start_serve(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "notifyd", "serve"],
            env={"PATH": os.environ.get("PATH", ""), **env},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (code := proc.poll()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} still running after {timeout}s")
        await asyncio.sleep(0.02)
    return code


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


async def test_serve_sends_ready_then_watchdog_then_stopping_and_exits_0(
    database_url: str, redis_url: str, listener: NotifyListener, notify_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    env = base_env(
        database_url,
        redis_url,
        NOTIFYD_PORT=str(port),
        NOTIFY_SOCKET=str(notify_path),
        WATCHDOG_USEC="400000",
    )
    log_path = tmp_path / "serve.log"
    proc = start_serve(env, log_path)
    try:
        ready = await listener.receive(timeout=20)
        assert ready.startswith("READY=1"), ready
        said = fields(ready)
        assert said["READY"] == "1"
        assert said["MAINPID"] == str(proc.pid)
        assert str(port) in said["STATUS"]
        # READY=1 means serving: the port answers right away
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            assert response.status == 200

        # WATCHDOG_USEC=400000: a ping every 0.2 s, so at least 3 in about 1.5 s
        started = time.monotonic()
        pings = 0
        while pings < 3:
            message = await listener.receive(timeout=max(0.01, 1.5 - (time.monotonic() - started)))
            assert message == "WATCHDOG=1", message
            pings += 1
        assert time.monotonic() - started < 1.5

        proc.send_signal(signal.SIGTERM)
        _, before = await listener.receive_until("STOPPING=1", timeout=10)
        assert set(before) <= {"WATCHDOG=1"}
        assert await wait_exit(proc, timeout=15) == 0, log_path.read_text()
    finally:
        stop_child(proc)


async def test_abstract_namespace_notify_socket(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """NOTIFY_SOCKET="@name" means the Linux abstract namespace, as systemd documents."""
    name = f"notifyd-test-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    env = base_env(database_url, redis_url, NOTIFYD_PORT=str(free_port()), NOTIFY_SOCKET="@" + name)
    log_path = tmp_path / "serve.log"
    proc = start_serve(env, log_path)
    try:
        ready = await listener.receive(timeout=20)
        assert fields(ready)["READY"] == "1"
        assert fields(ready)["MAINPID"] == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        stopping, before = await listener.receive_until("STOPPING=1", timeout=10)
        assert stopping == "STOPPING=1"
        assert before == []  # no WATCHDOG_USEC: no watchdog pings
        assert await wait_exit(proc, timeout=15) == 0, log_path.read_text()
    finally:
        stop_child(proc)
        listener.close()


class Crasher:
    name = "crasher"

    def __init__(self) -> None:
        self.broken = True

    async def run(self, stop: asyncio.Event) -> None:
        if self.broken:
            raise RuntimeError("crasher broke")
        await stop.wait()


async def test_watchdog_is_fed_only_while_every_actor_is_healthy(
    settings: Settings,
    listener: NotifyListener,
    notify_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon whose actor keeps crashing stops feeding the watchdog, so systemd restarts it."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s while healthy
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    crasher = Crasher()
    daemon = Daemon(settings, notifier=SystemdNotifier(str(notify_path)), extra_actors=[crasher])
    await daemon.start()
    try:
        ready = await listener.receive(timeout=10)
        assert fields(ready)["READY"] == "1"
        # five watchdog periods with a failing actor: not one ping
        assert "WATCHDOG=1" not in await listener.collect_for(0.5)
        crasher.broken = False
        message, _ = await listener.receive_until("WATCHDOG=1", timeout=10)
        assert message == "WATCHDOG=1"
    finally:
        await daemon.stop()
    stopping, _ = await listener.receive_until("STOPPING=1", timeout=5)
    assert stopping == "STOPPING=1"
    daemon.notifier.close()


# ------------------------------------------------------------------ SystemdNotifier itself


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    notifier.close()
    assert SystemdNotifier("").notify("READY=1") is False


def test_notify_sends_one_datagram_per_state(notify_path: Path, listener: NotifyListener) -> None:
    notifier = SystemdNotifier(str(notify_path))
    try:
        assert notifier.enabled
        assert notifier.notify("READY=1\nSTATUS=hi") is True
        assert notifier.notify("WATCHDOG=1") is True
    finally:
        notifier.close()
    listener.sock.settimeout(2)
    assert listener.sock.recv(4096) == b"READY=1\nSTATUS=hi"
    assert listener.sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.notify("STOPPING=1") is False  # closed: a no-op, not an error


def test_notify_to_a_missing_socket_returns_false_not_raises(tmp_path: Path) -> None:
    """A failed notify never takes the daemon down."""
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens.sock"))
    try:
        assert notifier.enabled
        assert notifier.notify("READY=1") is False
    finally:
        notifier.close()


def test_notify_to_a_receiver_that_does_not_read_drops_the_state_instead_of_blocking(
    notify_path: Path, listener: NotifyListener
) -> None:
    """The promise (issue 24, "every wait has a deadline"): notify runs on the event loop,
    so a full receive queue (systemd not reading) must not block it: past the queue's
    room, notify returns False at once. A blocking send froze the whole daemon."""
    notifier = SystemdNotifier(str(notify_path))
    try:
        sent = [notifier.notify("WATCHDOG=1") for _ in range(10_000)]
    finally:
        notifier.close()
    assert sent[0] is True
    assert sent[-1] is False  # the queue filled up long before; nothing waited for room


def test_notify_socket_from_environment(
    notify_path: Path, listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    notifier = SystemdNotifier()
    try:
        assert notifier.notify("READY=1") is True
    finally:
        notifier.close()
    listener.sock.settimeout(2)
    assert listener.sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("400000", None, 0.2),
        ("30000000", None, 15.0),
        ("400000", "self", 0.2),
        ("400000", "other", None),
        (None, None, None),
        ("", None, None),
        ("not-a-number", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    interval = SystemdNotifier("").watchdog_interval()
    if expected is None:
        assert interval is None
    else:
        assert interval == pytest.approx(expected)
