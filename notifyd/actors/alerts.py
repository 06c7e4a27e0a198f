"""Operator alerts by email to `RECIPIENT_LIST` (the first seed's "logs errors to email").

Raising an alert never blocks or fails the caller: it goes on a small bounded queue, and the
alerts actor sends it through the global SMTP relay. Each kind of alert is sent at most once
per `NOTIFYD_ALERT_INTERVAL` across all instances (a Redis key with a TTL), so a failing relay
or a crash loop produces one email, not thousands.

Other actors raise alerts through the `notifyd.alerts.Alerting` port, which the composition
root fills with this actor: no actor imports another (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib
from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd.keys import Keys
from notifyd.settings import Settings

log = logging.getLogger("notifyd.alerts")  # the name operators filter on

QUEUE_SIZE = 100


@dataclass(frozen=True, slots=True)
class Alert:
    kind: str
    subject: str
    body: str


class Alerts:
    """The alerts actor: meets `notifyd.alerts.Alerting`."""

    name = "alerts"

    def __init__(self, settings: Settings, redis: Redis, keys: Keys) -> None:
        self._settings = settings
        self._redis = redis
        self._keys = keys
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self._settings.recipient_list)

    def raise_alert(self, kind: str, subject: str, body: str) -> None:
        """Queue an alert; dropped (and logged) when alerts are off or the queue is full."""
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(Alert(kind, subject, body))
        except asyncio.QueueFull:
            log.warning("alert dropped: queue full", extra={"kind": kind})

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            getter = asyncio.ensure_future(self._queue.get())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()  # never leave a getter behind to swallow the next alert
            if getter.cancelled() or not getter.done():
                return
            await self._deliver(getter.result())

    async def _deliver(self, alert: Alert) -> None:
        try:
            first = await self._redis.set(
                self._keys.alert_gate(alert.kind),
                b"1",
                nx=True,
                ex=max(1, int(self._settings.alert_interval)),
            )
        except RedisError:
            first = True  # better one email too many than an outage nobody hears about
        if not first:
            return
        s = self._settings
        message = EmailMessage()
        message["From"] = s.email_from
        message["To"] = ", ".join(s.recipient_list)
        message["Subject"] = alert.subject
        message["Date"] = formatdate(usegmt=True)
        message["Message-ID"] = make_msgid(domain=s.email_from.rpartition("@")[2] or None)
        message.set_content(alert.body)
        try:
            await aiosmtplib.send(
                message,
                hostname=s.email_host,
                port=s.email_port,
                username=s.email_host_user or None,
                password=s.email_host_password or None,
                use_tls=s.email_use_ssl,
                start_tls=s.email_use_tls,
                timeout=s.send_timeout,
            )
            self.sent += 1
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.error(
                "operator alert could not be sent", extra={"kind": alert.kind, "error": str(exc)}
            )
            # open the gate again: the next alert of this kind should try, not be swallowed
            with contextlib.suppress(RedisError):
                await self._redis.delete(self._keys.alert_gate(alert.kind))
