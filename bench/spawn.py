"""The harness's side of `bench.servers`: start one in its own process, read what it reports.

A server process is stopped by closing its stdin (it exits on EOF), then SIGTERM, then
SIGKILL, each after a bound, so a run never leaves one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from bench.common import BenchError

ROOT = Path(__file__).resolve().parent.parent
START_BOUND_S = 20.0
STOP_BOUND_S = 5.0


class BareServer:
    """`async with BareServer("http") as server:` → `server.port`, `server.pid`; every line
    the process prints after `ready` goes to `on_line`."""

    def __init__(self, kind: str, *args: str, on_line: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self._args = args
        self._on_line = on_line
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def __aenter__(self) -> BareServer:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.servers",
            self.kind,
            *self._args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        assert self._process.stdout is not None
        try:
            first = await asyncio.wait_for(self._process.stdout.readline(), START_BOUND_S)
        except TimeoutError:
            first = b""
        word, _, port = first.decode().partition(" ")
        if word != "ready":
            await self._stop()
            raise BenchError(
                f"`python -m bench.servers {self.kind} {' '.join(self._args)}` did not start "
                f"(a port in use? its stderr says why)"
            )
        self.port = int(port)
        self._reader = asyncio.create_task(self._read(), name=f"bare-{self.kind}-stdout")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            if self._on_line is not None:
                self._on_line(line.decode().rstrip("\n"))

    async def _stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        for step in (None, process.terminate, process.kill):
            if step is not None and process.returncode is None:
                step()
            try:
                await asyncio.wait_for(process.wait(), STOP_BOUND_S)
                break
            except TimeoutError:
                continue
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, STOP_BOUND_S)


class MailLog:
    """What the SMTP sink reported: arrival times (CLOCK_MONOTONIC ns) per subject token.

    `expect(tokens)` names the tokens that count; `arrived` is set once each of them has
    arrived at least once, so a waiter never polls."""

    def __init__(self) -> None:
        self.arrivals: dict[str, list[int]] = {}
        self.untagged = 0
        self._expected: set[str] = set()
        self._outstanding = 0
        self.arrived = asyncio.Event()

    def expect(self, tokens: set[str]) -> None:
        self._expected = set(tokens)
        self._outstanding = sum(1 for t in self._expected if t not in self.arrivals)
        if self._outstanding == 0:
            self.arrived.set()
        else:
            self.arrived.clear()

    def on_line(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind != "m":
            return
        stamp, _, token = rest.partition(" ")
        if token == "-":
            self.untagged += 1
            return
        seen = self.arrivals.setdefault(token, [])
        seen.append(int(stamp))
        if len(seen) == 1 and token in self._expected:
            self._outstanding -= 1
            if self._outstanding == 0:
                self.arrived.set()

    def count(self, prefix: str) -> int:
        """Messages (every arrival, duplicates too) whose token starts with `prefix`."""
        return sum(len(v) for k, v in self.arrivals.items() if k.startswith(prefix))

    def duplicates(self, prefix: str) -> int:
        return sum(len(v) - 1 for k, v in self.arrivals.items() if k.startswith(prefix))

    def first(self, token: str) -> int | None:
        seen = self.arrivals.get(token)
        return seen[0] if seen else None

    async def wait(self, deadline: float) -> bool:
        """Until every expected token arrived or the monotonic `deadline`; True when all did."""
        try:
            await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True
