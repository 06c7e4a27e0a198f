"""The bounce listener (issue 29): an SMTP server of notifyd's own for NOTIFYD_BOUNCE_DOMAIN.

The domain's MX (or the relay, by a transport rule) forwards mail for
`bounce+<id>@NOTIFYD_BOUNCE_DOMAIN` here, on NOTIFYD_BOUNCE_SMTP_HOST:PORT. aiosmtpd's
protocol runs on the daemon's own loop (no thread). `RCPT TO` anything but a VERP address of
the domain is refused (550), a message larger than NOTIFYD_BOUNCE_MAX_BYTES too (552, by
aiosmtpd before it is read whole). Each accepted message is read (`notifyd.bounces`) and
applied per named notification in one transaction (`store.bounces`); a message that reads as
neither a bounce nor a complaint is accepted and dropped (an auto-reply, a vacation notice):
refusing it would only make the sender bounce the bounce. A database failure answers 451, so
the forwarding server tries again later.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from email import message_from_bytes
from email.policy import compat32
from typing import Any

import asyncpg
from aiosmtpd.smtp import SMTP

from notifyd.bounces import notification_of, read_report
from notifyd.settings import Settings
from notifyd.store import bounces as store

log = logging.getLogger("notifyd.actors.bounce_listener")

COMMAND_TIMEOUT_S = 30.0  # a forwarding server idle this long between commands is dropped


class _Handler:
    def __init__(self, pool: asyncpg.Pool, domain: str) -> None:
        self._pool = pool
        self._domain = domain

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if notification_of(address, self._domain) is None:
            return "550 5.1.1 not a bounce address of this domain"
        if len(envelope.rcpt_tos) >= 10:
            return "452 4.5.3 too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        try:
            report = read_report(message_from_bytes(raw, policy=compat32))
        except Exception:  # a malformed message is the sender's problem, not ours
            log.info("bounce message not readable; dropped")
            return "250 OK (not readable)"
        detail = "complaint (ARF)" if report.complaint else _detail(report)
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                for address in envelope.rcpt_tos:
                    notification_id = notification_of(address, self._domain)
                    assert notification_id is not None  # checked at RCPT TO
                    if report.complaint:
                        done = await store.complaint(conn, notification_id, detail)
                    else:
                        done = await store.bounce(
                            conn, notification_id, report.permanent, report.temporary, detail
                        )
                    log.info(
                        "bounce report",
                        extra={"id": str(notification_id), "outcome": done or "ignored"},
                    )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("bounce report not recorded", extra={"error": str(exc)})
            return "451 4.3.0 try again later"
        return "250 OK"


def _detail(report: Any) -> str:
    if report.permanent:
        return "permanent failure reported for " + ", ".join(sorted(report.permanent))
    if report.temporary:
        return "delivery delayed for " + ", ".join(sorted(report.temporary))
    return "no failure found"


class BounceListener:
    name = "bounce_listener"

    def __init__(self, *, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        handler = _Handler(self._pool, s.bounce_domain)
        loop = asyncio.get_running_loop()
        sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

        def session() -> SMTP:
            smtp = SMTP(
                handler,
                data_size_limit=s.bounce_max_bytes,
                hostname=s.bounce_domain,
                timeout=COMMAND_TIMEOUT_S,
                loop=loop,
            )
            sessions.add(smtp)
            return smtp

        server = await loop.create_server(
            session,
            host=s.bounce_smtp_host,
            port=s.bounce_smtp_port,
        )
        log.info(
            "bounce listener up", extra={"host": s.bounce_smtp_host, "port": s.bounce_smtp_port}
        )
        try:
            await stop.wait()
        finally:
            server.close()
            # closing the server stops new sessions only (Python 3.11): hang up on the open
            # ones, so a stopping daemon holds no socket a sender is mid-report on
            for open_session in list(sessions):
                if open_session.transport is not None:
                    open_session.transport.close()
            await server.wait_closed()
