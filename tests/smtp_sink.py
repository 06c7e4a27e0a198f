"""A real SMTP server (aiosmtpd) for tests: records what arrives, can be told to refuse.

It runs in aiosmtpd's own thread, so the daemon under test talks to it over a real socket
exactly as it would to a relay. Each SMTP session (connection) is numbered when it first
greets (EHLO/HELO), so tests can count how many connections a sender opened; a recipient can be
refused at RCPT with `refuse_rcpt`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from scripts.localservers import free_port


@dataclass(frozen=True)
class Relay:
    """The SMTP settings a test hands `SmtpProvider` directly (`providers.smtp.SmtpSettings`),
    in place of a tenant's stored ones: a relay such as this sink, or any other server."""

    host: str
    port: int
    username: str = ""
    password: str = ""
    use_tls: bool = False
    use_ssl: bool = False
    from_email: str = "hr@example.com"
    operator_relay: bool = False


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    session: int = 0  # the number of the SMTP session (connection) it arrived on

    @property
    def notifyd_id(self) -> str | None:
        value = self.message["X-Notifyd-Id"]
        return None if value is None else str(value)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    def _greeted(self, session: Any, hostname: str) -> None:
        session.host_name = hostname
        if getattr(session, "sink_number", None) is None:
            session.sink_number = self._sink._new_session()

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        self._greeted(session, hostname)
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self._greeted(session, hostname)
        return responses

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self._sink._quit()
        return "221 Bye"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        with self._sink._lock:
            self._sink.rcpts.append(address)
        refusal = self._sink._refusal(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self._sink.delay:
            await asyncio.sleep(self._sink.delay)  # a slow relay: the 250 comes this late
        scripted = self._sink._next_reply()
        if scripted is not None:
            return scripted
        parsed = message_from_bytes(envelope.content, policy=policy.SMTP)
        assert isinstance(parsed, EmailMessage)
        with self._sink._lock:
            self._sink.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    parsed,
                    getattr(session, "sink_number", 0) or 0,
                )
            )
        return "250 Message accepted for delivery"


class SessionsController(Controller):
    """aiosmtpd's controller, keeping its sessions so `stop` can hang up on them: its own
    stop halts the loop before the cancelled sessions run, leaving their sockets to the
    garbage collector (an "unclosed transport" warning in whichever test runs next)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sessions: list[SMTP] = []

    def factory(self) -> SMTP:
        smtp = super().factory()
        self._sessions.append(smtp)
        return smtp

    async def _hang_up(self) -> None:
        for smtp in self._sessions:
            if smtp.transport is not None:
                smtp.transport.close()
        self._sessions.clear()
        await asyncio.sleep(0)  # connection_lost runs: the sockets are closed now

    def stop(self, no_assert: bool = False) -> None:
        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(self._hang_up(), self.loop).result(timeout=10)
        super().stop(no_assert)


class SmtpSink:
    """`with SmtpSink() as sink:` → `sink.port`, `sink.received`, `sink.fail_next(n, reply)`,
    `sink.refuse_rcpt(address, reply)`, `sink.rcpts` (every RCPT TO asked), `sink.sessions`
    (SMTP sessions that greeted), `sink.delay` (a slow relay)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.rcpts: list[str] = []  # every RCPT TO address asked for, refused or not
        self._replies: deque[str] = deque()
        self._refusals: dict[str, str] = {}
        self._sessions = 0
        self._quits = 0
        self._lock = threading.Lock()
        self.delay = 0.0  # seconds each message waits for its 250 (sessions run concurrently)
        self._controller = SessionsController(_Handler(self), hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> SmtpSink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def restart(self) -> None:
        """Stop (dropping every open connection, as a relay restart does) and listen again on
        the same port."""
        self._controller.stop()
        self._controller = SessionsController(_Handler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def fail_next(self, count: int, reply: str) -> None:
        """The next `count` messages get `reply` (e.g. "421 Try again later") at DATA."""
        with self._lock:
            self._replies.extend([reply] * count)

    def refuse_rcpt(self, address: str, reply: str) -> None:
        """Every RCPT TO `address` gets `reply` (e.g. "550 5.1.1 No such user") from now on."""
        with self._lock:
            self._refusals[address.lower()] = reply

    @property
    def sessions(self) -> int:
        """How many SMTP sessions (connections) have greeted with EHLO or HELO so far."""
        with self._lock:
            return self._sessions

    @property
    def quits(self) -> int:
        """How many clients said QUIT (closed their connection cleanly)."""
        with self._lock:
            return self._quits

    def _quit(self) -> None:
        with self._lock:
            self._quits += 1

    def _new_session(self) -> int:
        with self._lock:
            self._sessions += 1
            return self._sessions

    def _refusal(self, address: str) -> str | None:
        with self._lock:
            return self._refusals.get(address.lower())

    def _next_reply(self) -> str | None:
        with self._lock:
            return self._replies.popleft() if self._replies else None

    def messages_to(self, address: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if address in r.rcpt_tos]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        """Block (this is a thread-safe list) until `count` messages arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.01)
        raise AssertionError(f"{len(self.received)} of {count} messages arrived in {timeout}s")
