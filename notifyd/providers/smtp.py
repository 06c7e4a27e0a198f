"""Email over SMTP with aiosmtplib: per-tenant settings, reused connections, clean MIME.

Connections are pooled per distinct SMTP configuration (a tenant's own relay, or the global
`EMAIL_*` one), a few per configuration, so a burst does not open a connection per message
and one tenant's slow relay cannot take every connection.

Error classes follow SMTP itself: 4xx replies and connection trouble are transient (retried),
5xx replies are permanent (the delivery fails).

A tenant's own relay is reached through the egress policy (`notifyd.egress`): its host is
resolved and checked when a connection is opened, and the connection goes to the checked
address (TLS still verifies the name). The operator's `EMAIL_*` relay is not checked.

What `last_error` says of a failure (the tenant reads it): what failed, in our own words
(connection refused, timed out, TLS failed, refused by the egress policy, an SMTP reply code
with its standard meaning); never a banner, a greeting or another free text of the server
before the mail transaction, so a service that is not a mail relay cannot be read through
it. The server's text is kept only for its replies to MAIL FROM, RCPT TO and DATA (a
relay that greeted as one and said why it refused this message, e.g. `550 5.1.1 user
unknown`), on one line of printable ASCII, at most `REPLY_TEXT_MAX` characters.

Not reaching the relay at all (connect, TLS, the greeting within NOTIFYD_SMTP_CONNECT_TIMEOUT,
a hung session, a name that does not resolve) is `Unreachable`, which the sender's circuit
breaker for that relay counts; a reply, even a refusal, is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formataddr, formatdate, parseaddr
from typing import Protocol

import aiosmtplib

from notifyd.egress import Egress, EgressRefused, ResolveFailed
from notifyd.providers.base import (
    Delivery,
    PermanentError,
    RecipientRefused,
    Route,
    Sent,
    TransientError,
    Unreachable,
)
from notifyd.tags import header_problem

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
    @property
    def operator_relay(self) -> bool:
        """The operator's own relay (`EMAIL_*`), exempt from the egress policy."""
        ...


@dataclass(frozen=True, slots=True)
class _PoolKey:
    host: str
    port: int
    username: str
    password: str
    use_tls: bool
    use_ssl: bool
    operator_relay: bool


@dataclass(frozen=True, slots=True)
class Built:
    """A message ready for the relay: envelope sender, its id, the bytes to send."""

    sender: str
    message_id: str
    data: bytes


def _header_safe(name: str, value: str) -> None:
    """No line break or other control character (tags.HEADER_UNSAFE): the email package
    starts a new header at \x0b, \x0c, \x85, \u2028… as at CR/LF, so any of them, whatever
    got this far, could inject a header, or make the message unbuildable on every retry."""
    problem = header_problem(value)
    if problem is not None:
        raise PermanentError(f"cannot build the message headers: {name} {problem}")


def _header(name: str, value: str) -> str:
    """A header value safe to send (`_header_safe`), non-ASCII encoded as RFC 2047 words."""
    _header_safe(name, value)
    return value if value.isascii() else Header(value, "utf-8").encode()


def _address(name: str, value: str) -> str:
    """An address header: a display name may be non-ASCII, the address itself may not."""
    _header_safe(name, value)
    display, address = parseaddr(value)
    if not address or not address.isascii():
        raise PermanentError(f"cannot build the message headers: {name} {value!r}")
    return formataddr((display, address), charset="utf-8")


@dataclass(frozen=True, slots=True)
class ListUnsubscribe:
    """What an email's List-Unsubscribe says: `url`, and with `one_click` the RFC 8058
    `List-Unsubscribe-Post` promise that a POST to it unsubscribes (notifyd's own
    /unsubscribe/ route does; an external preferences page need not)."""

    url: str
    one_click: bool = False


def build_message(
    delivery: Delivery, from_email: str, unsubscribe: ListUnsubscribe | str | None = None
) -> Built:
    """Text with an HTML alternative when there is one; headers a spam filter expects.

    Built with the email package's compat32 classes: its default policy parses every header
    it is given and costs several times as much a message, which at the email rates notifyd
    is built for is most of a core (docs/benchmarks.md). The checks that policy gave (no line
    break or other control character in a header, addresses well formed) are made here
    instead.

    A message that cannot be built fails for good (`PermanentError` with the reason), however
    the email package refuses it: the same row would fail the same way on every retry.
    """
    try:
        if isinstance(unsubscribe, str):
            unsubscribe = ListUnsubscribe(unsubscribe)
        return _build(delivery, from_email, unsubscribe)
    except PermanentError:
        raise
    except Exception as exc:  # HeaderParseError, UnicodeError, …: the content's fault
        raise PermanentError(
            f"cannot build the message: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def _build(delivery: Delivery, from_email: str, unsubscribe: ListUnsubscribe | None) -> Built:
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
    if unsubscribe is not None and unsubscribe.url:
        message["List-Unsubscribe"] = _header("List-Unsubscribe", f"<{unsubscribe.url}>")
        if unsubscribe.one_click:
            message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    return Built(parseaddr(from_email)[1], message_id, message.as_bytes())


class _ConnectionPool:
    """Up to `size` connected clients for one configuration, handed out one at a time."""

    def __init__(
        self,
        key: _PoolKey,
        size: int,
        timeout: float,
        egress: Egress | None,
        connect_timeout: float | None = None,
    ) -> None:
        self._key = key
        self._timeout = timeout
        self._connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._egress = egress  # None: the operator's relay, connected to by name
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)
        self.retired = False  # the configuration changed: connections close, none are kept

    async def _connect(self) -> aiosmtplib.SMTP:
        k = self._key
        # a tenant's relay: resolved and checked now, connected to at the checked address;
        # `hostname` stays the name, which TLS verifies the certificate against
        sock = None
        if self._egress is not None:
            async with asyncio.timeout(self._connect_timeout):
                sock = await self._egress.connect(k.host, k.port)
        client = aiosmtplib.SMTP(
            hostname=k.host,
            port=k.port if sock is None else None,
            sock=sock,
            use_tls=k.use_ssl,
            start_tls=k.use_tls,
            timeout=self._timeout,
            tls_context=ssl.create_default_context() if (k.use_tls or k.use_ssl) else None,
        )
        try:
            # TCP connect, TLS and the greeting within the connect timeout: a relay that
            # accepts and never speaks is given up on well before the whole send's timeout
            await client.connect(timeout=self._connect_timeout)
            if k.username:
                await client.login(k.username, k.password)
        except BaseException:
            client.close()  # a failed connect or login must not leak the connection
            if sock is not None:
                sock.close()  # not yet handed to a transport when connect failed early
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
        connect_timeout: float | None = None,
        unsubscribe_url_for: Callable[[Delivery], ListUnsubscribe | None] | None = None,
        return_path_for: Callable[[str], str] | None = None,
        egress: Egress | None = None,
    ) -> None:
        """`egress`: the policy for tenants' own relays (configurations whose
        `operator_relay` is false); None checks nothing (tests of the provider alone)."""
        self._config_for = config_for
        self._egress = egress
        self._connect_timeout = connect_timeout
        self._size = connections_per_config
        self._timeout = timeout
        self._unsubscribe_url_for = unsubscribe_url_for
        # the envelope sender (bounces go there): a VERP address naming the notification
        self._return_path_for = return_path_for
        self._pools: dict[_PoolKey, _ConnectionPool] = {}
        self._tenant_pools: dict[str, _ConnectionPool] = {}  # the pool each tenant used last

    def _pool(self, config: SmtpSettings) -> _ConnectionPool:
        key = _pool_key(config)
        pool = self._pools.get(key)
        if pool is None:
            egress = None if config.operator_relay else self._egress
            pool = self._pools[key] = _ConnectionPool(
                key, self._size, self._timeout, egress, self._connect_timeout
            )
        return pool

    async def route(self, tenant_id: str) -> Route | None:
        """One circuit breaker per relay configuration, as one connection pool; the
        operator's relay is "global" in metrics and "the platform relay" in `last_error`."""
        config = await self._config_for(tenant_id)
        if config.operator_relay:
            return Route(_pool_key(config), "global", "the platform relay")
        return Route(_pool_key(config), tenant_id, f"{config.host}:{config.port}")

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
                    sender = (
                        self._return_path_for(delivery.id)
                        if self._return_path_for is not None
                        else message.sender
                    )
                    await client.sendmail(sender, [delivery.recipient], message.data)
                return Sent(provider_message_id=message.message_id, provider_status="sent")
            except EgressRefused as exc:
                log.warning(
                    "tenant SMTP relay refused by the egress policy",
                    extra={
                        "tenant_id": delivery.tenant_id,
                        "host": config.host,
                        "address": exc.address,
                        "port": config.port,
                    },
                )
                raise PermanentError(f"refused by the egress policy: {exc.message}") from None
            except ResolveFailed as exc:
                raise Unreachable(f"cannot resolve the SMTP relay: {exc}") from None
            except aiosmtplib.SMTPServerDisconnected:
                # an idle pooled connection the server closed: one immediate retry, on a new
                # connection, and none of the other idle ones (they idled as long)
                if reused_attempt:
                    pool.discard_idle()
                    continue
                raise Unreachable("the SMTP relay closed the connection") from None
            except aiosmtplib.SMTPRecipientsRefused as exc:
                raise _classify_refusals(exc) from None
            except aiosmtplib.SMTPResponseException as exc:
                raise _classify_reply(exc) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise Unreachable(_connection_failure(exc)) from None
        raise Unreachable("the SMTP relay closed the connection twice")

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
        self._tenant_pools.clear()


def _pool_key(config: SmtpSettings) -> _PoolKey:
    return _PoolKey(
        config.host,
        config.port,
        config.username,
        config.password,
        config.use_tls,
        config.use_ssl,
        config.operator_relay,
    )


REPLY_TEXT_MAX = 200
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?=\s|$)")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_TLS_REASON = re.compile(r"[A-Z0-9_]{1,64}")

# RFC 5321 4.2.2-4.2.3 (and RFC 4954, 3207 for AUTH and STARTTLS): what a code means,
# said in our words so a connection-phase reply needs none of the server's
_MEANINGS = {
    221: "closing the connection",
    421: "service not available",
    432: "a password transition is needed",
    450: "mailbox unavailable",
    451: "local error in processing",
    452: "insufficient system storage",
    454: "temporary authentication failure or TLS not available",
    455: "server unable to accommodate parameters",
    500: "syntax error, command unrecognized",
    501: "syntax error in parameters",
    502: "command not implemented",
    503: "bad sequence of commands",
    504: "command parameter not implemented",
    521: "does not accept mail",
    530: "authentication required",
    534: "authentication mechanism too weak",
    535: "authentication credentials invalid",
    538: "encryption required for this authentication",
    550: "mailbox unavailable",
    551: "user not local",
    552: "exceeded storage allocation",
    553: "mailbox name not allowed",
    554: "transaction failed",
    555: "parameters not recognized",
    556: "domain does not accept mail",
}
_CLASS_MEANINGS = {4: "temporary failure", 5: "permanent failure"}

# the replies whose text is kept: the mail transaction's, from a relay that greeted as one
_TRANSACTION_STAGES: tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...] = (
    (aiosmtplib.SMTPSenderRefused, "MAIL FROM"),
    (aiosmtplib.SMTPRecipientRefused, "RCPT TO"),
    (aiosmtplib.SMTPDataError, "DATA"),
)
_SETUP_STAGES: tuple[tuple[type[aiosmtplib.SMTPResponseException], str], ...] = (
    (aiosmtplib.SMTPConnectResponseError, "greeting"),
    (aiosmtplib.SMTPHeloError, "EHLO"),
    (aiosmtplib.SMTPAuthenticationError, "AUTH"),
)


def _one_line(text: str) -> str:
    """A server's text as it may be shown: one line, printable ASCII, bounded."""
    line = " ".join(_UNPRINTABLE.sub("?", part).strip() for part in text.splitlines())
    return line if len(line) <= REPLY_TEXT_MAX else line[: REPLY_TEXT_MAX - 3] + "..."


def _reason(code: int, text: str, stage: str | None, keep_text: bool) -> str:
    at = f" at {stage}" if stage else ""
    if keep_text:
        return f"SMTP {code}{at}: {_one_line(text)}"
    enhanced = _ENHANCED.match(text.lstrip())
    meaning = _MEANINGS.get(code) or _CLASS_MEANINGS.get(code // 100, "unexpected reply")
    return f"SMTP {code}{' ' + enhanced.group() if enhanced else ''}{at} ({meaning})"


def _classify_reply(exc: aiosmtplib.SMTPResponseException) -> TransientError | PermanentError:
    """Only a 5xx reply is the server's final no; anything else unexpected (4xx, a garbled
    or out-of-sequence reply) is worth another try. A reply that is not SMTP at all (another
    kind of service answered) is said to be so, and nothing of it is quoted."""
    code = exc.code
    if not 200 <= code < 600:
        return TransientError("the SMTP relay's answer is not SMTP")
    stage = next((name for kind, name in _TRANSACTION_STAGES if isinstance(exc, kind)), None)
    keep_text = stage is not None
    if stage is None:
        stage = next((name for kind, name in _SETUP_STAGES if isinstance(exc, kind)), None)
    reason = _reason(code, exc.message, stage, keep_text)
    if isinstance(exc, aiosmtplib.SMTPRecipientRefused) and mailbox_refused(code, exc.message):
        return RecipientRefused(reason, "smtp_refused")
    if 500 <= code < 600:
        return PermanentError(reason)
    return TransientError(reason)


# RFC 3463: 5.1.x is a bad address (5.1.1 no such mailbox, 5.1.2 no such domain, 5.1.10 null
# MX), 5.2.1 a disabled mailbox. Without an enhanced code: 550, 551, 553 (RFC 5321 4.2.2).
# A 5.7.x (policy, spam, authentication) or 552/554 is a refusal of this message, not of the
# address: it fails the delivery and suppresses nothing.
_DEAD_ADDRESS = re.compile(r"5\.(1\.[0-9]{1,3}|2\.1)")
_DEAD_ADDRESS_CODES = frozenset({550, 551, 553})


def mailbox_refused(code: int, text: str) -> bool:
    """Whether a relay's reply to RCPT TO says the mailbox itself is gone for good (the
    address goes on the suppression list), not just that this message was refused."""
    if not 500 <= code < 600:
        return False
    enhanced = _ENHANCED.match(text.lstrip())
    if enhanced is not None:
        return _DEAD_ADDRESS.fullmatch(enhanced.group()) is not None
    return code in _DEAD_ADDRESS_CODES


def _classify_refusals(exc: aiosmtplib.SMTPRecipientsRefused) -> TransientError | PermanentError:
    refusals = exc.recipients
    reason = "; ".join(_reason(r.code, r.message, "RCPT TO", True) for r in refusals)
    if refusals and not any(500 <= r.code < 600 for r in refusals):
        return TransientError(reason)
    # one recipient per message: a refusal naming its mailbox as gone suppresses it
    if refusals and all(mailbox_refused(r.code, r.message) for r in refusals):
        return RecipientRefused(reason, "smtp_refused")
    return PermanentError(reason or "all recipients refused")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from (aiosmtplib wraps OSError and SSL errors)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _connection_failure(exc: BaseException) -> str:
    """A connection-phase failure in our own words: what failed, never what the peer said."""
    chain = _chain(exc)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if isinstance(tls, ssl.SSLCertVerificationError):
        why = _one_line(tls.verify_message or "unknown reason")
        return f"TLS failed: the relay's certificate did not verify ({why})"
    if tls is not None:
        reason = (
            tls.reason if tls.reason and _TLS_REASON.fullmatch(tls.reason) else "handshake error"
        )
        return f"TLS failed ({reason})"
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError):
        return "timed out connecting to the SMTP relay or waiting for its greeting"
    if isinstance(exc, aiosmtplib.SMTPTimeoutError):
        return "the SMTP relay did not answer in time"
    if isinstance(exc, TimeoutError):  # ours: the egress policy's connect
        return "timed out connecting to the SMTP relay"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection to the SMTP relay refused"
    if isinstance(exc, aiosmtplib.SMTPConnectError) and any(
        isinstance(e, aiosmtplib.SMTPServerDisconnected) for e in chain
    ):
        return "the SMTP relay closed the connection before its greeting"
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    if isinstance(os_error, OSError) and os_error.errno:
        return f"cannot connect to the SMTP relay: {os.strerror(os_error.errno)}"
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return "the SMTP relay does not offer an extension it needs to (STARTTLS, AUTH)"
    return f"SMTP connection failed ({type(exc).__name__})"
