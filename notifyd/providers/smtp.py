"""Email over SMTP with aiosmtplib: per-tenant settings, reused connections, clean MIME.

Connections are pooled per distinct SMTP configuration (a tenant's own relay, or the global
`EMAIL_*` one), a few per configuration, so a burst does not open a connection per message
and one tenant's slow relay cannot take every connection.

Error classes follow SMTP itself: 4xx replies and connection trouble are transient (retried),
5xx replies are permanent (the delivery fails with the server's words).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr
from typing import Protocol

import aiosmtplib

from notifyd.providers.base import Delivery, PermanentError, Sent, TransientError

log = logging.getLogger("notifyd.providers.smtp")


class SmtpSettings(Protocol):
    """What a sender needs of an SMTP configuration (the tenant's or the global one)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def username(self) -> str: ...
    @property
    def password(self) -> str: ...
    @property
    def use_tls(self) -> bool: ...
    @property
    def use_ssl(self) -> bool: ...
    @property
    def from_email(self) -> str: ...


@dataclass(frozen=True, slots=True)
class _PoolKey:
    host: str
    port: int
    username: str
    password: str
    use_tls: bool
    use_ssl: bool


@dataclass(frozen=True, slots=True)
class Built:
    """A message ready for the relay: envelope sender, its id, the bytes to send."""

    sender: str
    message_id: str
    data: bytes


def _header(name: str, value: str) -> str:
    """A header value safe to send: no CR/LF (no header can be injected, whatever got this
    far), non-ASCII encoded as RFC 2047 words."""
    if "\r" in value or "\n" in value:
        raise PermanentError(f"cannot build the message headers: {name} holds a line break")
    return value if value.isascii() else Header(value, "utf-8").encode()


def _address(name: str, value: str) -> str:
    """An address header: a display name may be non-ASCII, the address itself may not."""
    if "\r" in value or "\n" in value:
        raise PermanentError(f"cannot build the message headers: {name} holds a line break")
    display, address = parseaddr(value)
    if not address or not address.isascii():
        raise PermanentError(f"cannot build the message headers: {name} {value!r}")
    return formataddr((display, address), charset="utf-8")


def build_message(delivery: Delivery, from_email: str, unsubscribe_url: str | None = None) -> Built:
    """Text with an HTML alternative when there is one; headers a spam filter expects.

    Built with the email package's compat32 classes: its default policy parses every header
    it is given and costs about 0.4 ms a message, five times this, which at a thousand
    emails a second is most of a core. The checks that policy gave (no CR/LF in a header,
    addresses well formed) are made here instead.
    """
    text = MIMEText(delivery.body, "plain", "utf-8")
    if delivery.html_body:
        message: MIMEText | MIMEMultipart = MIMEMultipart("alternative")
        message.attach(text)
        message.attach(MIMEText(delivery.html_body, "html", "utf-8"))
    else:
        message = text
    sender = _address("From", from_email)
    domain = parseaddr(from_email)[1].rpartition("@")[2] or "notifyd.local"
    # one id per notification, the same on every attempt: a relay or mailbox that sees a
    # resend (a timeout after the relay had accepted) can tell it is the same message
    message_id = f"<{delivery.id.replace('-', '')}@{domain}>"
    message["From"] = sender
    message["To"] = _address("To", delivery.recipient)
    message["Subject"] = _header("Subject", delivery.subject or "")
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    message["X-Notifyd-Id"] = _header("X-Notifyd-Id", delivery.id)
    if unsubscribe_url:
        # no List-Unsubscribe-Post: one-click (RFC 8058) promises an HTTPS endpoint that
        # unsubscribes on POST, which a preferences page need not be
        message["List-Unsubscribe"] = _header("List-Unsubscribe", f"<{unsubscribe_url}>")
    return Built(parseaddr(from_email)[1], message_id, message.as_bytes())


class _ConnectionPool:
    """Up to `size` connected clients for one configuration, handed out one at a time."""

    def __init__(self, key: _PoolKey, size: int, timeout: float) -> None:
        self._key = key
        self._timeout = timeout
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)
        self.retired = False  # the configuration changed: connections close, none are kept

    async def _connect(self) -> aiosmtplib.SMTP:
        k = self._key
        client = aiosmtplib.SMTP(
            hostname=k.host,
            port=k.port,
            use_tls=k.use_ssl,
            start_tls=k.use_tls,
            timeout=self._timeout,
            tls_context=ssl.create_default_context() if (k.use_tls or k.use_ssl) else None,
        )
        await client.connect()
        if k.username:
            try:
                await client.login(k.username, k.password)
            except BaseException:
                client.close()  # a failed login must not leak the connection
                raise
        return client

    def _idle_connected(self) -> aiosmtplib.SMTP | None:
        """An idle client still connected; ones the server hung up on are dropped."""
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
            client.close()
        return None

    def discard_idle(self) -> None:
        """After a reused connection turned out dead (the relay restarted, or closes idle
        connections), the others idle since then are dead too: do not try them one by one."""
        while self._idle:
            self._idle.pop().close()

    @contextlib.asynccontextmanager
    async def connection(self, *, fresh: bool = False) -> AsyncIterator[aiosmtplib.SMTP]:
        async with self._slots:
            client = None if fresh else self._idle_connected()
            if client is None:
                client = await self._connect()
            try:
                yield client
            except BaseException:
                client.close()  # its state is unknown after an error: never reuse it
                raise
            if client.is_connected and not self.retired:
                self._idle.append(client)
            elif client.is_connected:
                client.close()

    async def close(self) -> None:
        self.retired = True
        while self._idle:
            client = self._idle.pop()
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()


class SmtpProvider:
    channel = "email"

    def __init__(
        self,
        config_for: Callable[[str], Awaitable[SmtpSettings]],
        *,
        connections_per_config: int,
        timeout: float,
        unsubscribe_url_for: Callable[[Delivery], str | None] | None = None,
    ) -> None:
        self._config_for = config_for
        self._size = connections_per_config
        self._timeout = timeout
        self._unsubscribe_url_for = unsubscribe_url_for
        self._pools: dict[_PoolKey, _ConnectionPool] = {}
        self._tenant_pools: dict[str, _ConnectionPool] = {}  # the pool each tenant used last

    def _pool(self, config: SmtpSettings) -> _ConnectionPool:
        key = _PoolKey(
            config.host,
            config.port,
            config.username,
            config.password,
            config.use_tls,
            config.use_ssl,
        )
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _ConnectionPool(key, self._size, self._timeout)
        return pool

    async def _retire_previous(self, tenant_id: str, current: _ConnectionPool) -> None:
        """A tenant moved to another relay (or credentials): close its old pool's connections
        once no tenant uses that configuration any more."""
        previous = self._tenant_pools.get(tenant_id)
        self._tenant_pools[tenant_id] = current
        if previous is None or previous is current:
            return
        if any(pool is previous for pool in self._tenant_pools.values()):
            return
        for key, pool in list(self._pools.items()):
            if pool is previous:
                del self._pools[key]
        await previous.close()

    async def send(self, delivery: Delivery) -> Sent:
        config = await self._config_for(delivery.tenant_id)
        unsubscribe = self._unsubscribe_url_for(delivery) if self._unsubscribe_url_for else None
        message = build_message(delivery, config.from_email, unsubscribe)
        pool = self._pool(config)
        await self._retire_previous(delivery.tenant_id, pool)
        for reused_attempt in (True, False):
            try:
                async with pool.connection(fresh=not reused_attempt) as client:
                    await client.sendmail(message.sender, [delivery.recipient], message.data)
                return Sent(provider_message_id=message.message_id, provider_status="sent")
            except aiosmtplib.SMTPServerDisconnected as exc:
                # an idle pooled connection the server closed: one immediate retry, on a new
                # connection, and none of the other idle ones (they idled as long)
                if reused_attempt:
                    pool.discard_idle()
                    continue
                raise TransientError(f"SMTP server disconnected: {exc}") from None
            except aiosmtplib.SMTPRecipientsRefused as exc:
                raise _classify_refusals(exc) from None
            except aiosmtplib.SMTPResponseException as exc:
                raise _classify_reply(exc.code, exc.message) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise TransientError(
                    f"SMTP connection failed: {exc or type(exc).__name__}"
                ) from None
        raise TransientError("SMTP server disconnected twice")

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        self._tenant_pools.clear()


def _classify_reply(code: int, text: str) -> TransientError | PermanentError:
    """Only a 5xx reply is the server's final no; anything else unexpected (4xx, a garbled
    or out-of-sequence reply) is worth another try."""
    reason = f"SMTP {code}: {text}".strip()
    if 500 <= code < 600:
        return PermanentError(reason)
    return TransientError(reason)


def _classify_refusals(exc: aiosmtplib.SMTPRecipientsRefused) -> TransientError | PermanentError:
    refusals = exc.recipients
    if refusals and not any(500 <= r.code < 600 for r in refusals):
        return TransientError("; ".join(f"SMTP {r.code}: {r.message}" for r in refusals))
    return PermanentError(
        "; ".join(f"SMTP {r.code}: {r.message}" for r in refusals) or "all recipients refused"
    )
