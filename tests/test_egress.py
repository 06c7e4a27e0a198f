"""Egress policy for tenants' own SMTP relays (notifyd/egress.py).

Promises checked (each test names its own): every kind of special address is named, IPv6
forms that carry a private IPv4 address included, and the operator's allowed networks let
them through; a tenant's relay at a loopback, private or link-local address (or a name that
resolves to one) is a 422 naming `smtp.host` when its settings are saved, a public address
on a port that is not an SMTP one a 422 naming `smtp.port`, and nothing is stored; with
NOTIFYD_EGRESS_ALLOWED_NETWORKS the same relays are accepted; a name that resolved to a
public address when saved and to loopback later (DNS rebinding) is refused at connection
time, while the operator's relay on loopback keeps working; the provider connects to the
address it checked, not to the name; `last_error` of a failed connection never quotes
what a foreign, non-SMTP service said; TLS is still verified against the host name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notifyd.app import Daemon
from notifyd.egress import Address, Egress, EgressRefused, special_kind
from notifyd.providers.base import Delivery, PermanentError, ProviderError, TransientError
from notifyd.providers.smtp import SmtpProvider
from notifyd.settings import Settings, SettingsError
from scripts.localservers import free_port
from tests.helpers import Api, make_settings, wait_for
from tests.smtp_sink import Relay, SessionsController, SmtpSink

KEY = "tenant-secret-key-for-egress-tests"
TENANT = "TEN-EGRESS"
OTHER = "TEN-GLOBAL"
PATH = "/tenants/current/settings/"
PUBLIC = "93.184.216.34"  # an address outside every special-purpose range
SECRET = "internal-secret-service"
FAST = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_SEND_TIMEOUT": "2",
    "NOTIFYD_SEND_MAX_ATTEMPTS": "2",
}


# -- which addresses are special -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "this network"),
        ("100.64.0.1", "carrier-grade NAT"),  # not is_private in Python 3.11
        ("224.0.0.1", "multicast"),  # is_global in Python 3.11
        ("ff02::1", "multicast"),
        ("fec0::1", "site-local"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "special-purpose"),  # documentation
        ("198.18.0.1", "special-purpose"),  # benchmarking
        ("::ffff:127.0.0.1", "loopback address inside an IPv6"),  # not is_loopback in 3.11
        ("::ffff:10.0.0.5", "private address inside an IPv6"),
        ("64:ff9b::a00:5", "private address inside an IPv6"),  # NAT64 to 10.0.0.5
        ("2002:a00:5::1", "private address inside an IPv6"),  # 6to4 through 10.0.0.5
        ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
        ("2001:db8::1", "special-purpose"),
    ],
)
def test_special_addresses_are_named(address: str, kind: str) -> None:
    """Promise: every loopback, private, link-local or otherwise special address is refused
    with its kind, including IPv6 forms that lead to a special IPv4 address."""
    found = special_kind(ipaddress.ip_address(address))
    assert found is not None and kind in found, (address, found)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", PUBLIC, "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_not_special(address: str) -> None:
    """Promise: a public relay (also through NAT64 or an IPv4-mapped form) is not refused."""
    assert special_kind(ipaddress.ip_address(address)) is None


def test_allowed_networks_and_ports() -> None:
    """Promise: an operator's network lets its special addresses through at any port (an
    IPv4 network also covers the IPv4-mapped form); a public address must use an SMTP
    port; an empty port list allows every port."""
    policy = Egress(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    loopback = ipaddress.ip_address("127.0.0.1")
    assert policy.refusal("relay", loopback, 10025) is None
    assert policy.refusal("relay", ipaddress.ip_address("::ffff:127.0.0.2"), 25) is None
    private = policy.refusal("relay", ipaddress.ip_address("10.0.0.5"), 25)
    assert private is not None and private.field == "host"
    public = ipaddress.ip_address(PUBLIC)
    assert policy.refusal("relay", public, 587) is None
    refused = policy.refusal("relay", public, 6379)
    assert refused is not None and refused.field == "port"
    assert "NOTIFYD_EGRESS_ALLOWED_PORTS" in refused.message
    assert Egress(allowed_ports=()).refusal("relay", public, 6379) is None


def test_settings_parse_networks_and_ports() -> None:
    """Promise: the policy's settings read as documented, and a wrong one is named."""

    def load(**env: str) -> Settings:
        return make_settings("postgresql://x@h/db", "redis://h", **env)

    default = load()
    assert default.egress_allowed_networks == ()
    assert default.egress_allowed_ports == (25, 465, 587, 2465, 2525, 2587)
    custom = load(
        NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.0/8, ::1, 10.0.5.25",
        NOTIFYD_EGRESS_ALLOWED_PORTS="any",
    )
    assert [str(n) for n in custom.egress_allowed_networks] == [
        "127.0.0.0/8",
        "::1/128",
        "10.0.5.25/32",
    ]
    assert custom.egress_allowed_ports == ()
    for env, value in (
        ("NOTIFYD_EGRESS_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("NOTIFYD_EGRESS_ALLOWED_PORTS", "25,70000"),
        ("NOTIFYD_EGRESS_RESOLVE_TIMEOUT", "0"),
        ("NOTIFYD_EGRESS_RESOLVE_THREADS", "0"),
    ):
        with pytest.raises(SettingsError, match=env):
            load(**{env: value})


# -- a daemon whose resolver the test controls -----------------------------------------------------


@dataclass
class Dns:
    """A resolver for the daemon: fixed answers per name; other names go unanswered."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[Address]:
        self.asked.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in self.answers[host]]


@asynccontextmanager
async def daemon_with(
    settings: Settings, resolver: Callable[[str, int], Awaitable[list[Address]]] | None = None
) -> AsyncIterator[Api]:
    daemon = Daemon(settings, egress=Egress.from_settings(settings, resolver))
    await daemon.start()
    try:
        async with Api(daemon) as api:
            yield api
    finally:
        await daemon.stop()


async def put_smtp(api: Api, host: str, port: int, tenant: str = TENANT) -> tuple[int, Any]:
    smtp = {"host": host, "port": port, "from_email": "hr@tenant.example"}
    status, body, _ = await api.request(
        "PUT", PATH, json={"smtp": smtp}, tenant=tenant, user="admin-1", role="admin"
    )
    return status, body


async def send(api: Api, tenant: str) -> str:
    body = {
        "notification_type": "email",
        "recipient": "candidate@example.com",
        "subject": "Interview",
        "message": "Tomorrow at 10.",
    }
    status, answer, _ = await api.post(
        "/notifications/send/", body, tenant=tenant, user="backend", role="service"
    )
    assert status == 202, answer
    return str(answer["notification_id"])


async def settled(db: asyncpg.Connection, notification_id: str, *states: str) -> asyncpg.Record:
    """The row once it reached one of `states`."""
    query = "SELECT status, last_error FROM notifications WHERE id = $1::uuid"

    async def reached() -> bool:
        record = await db.fetchrow(query, notification_id)
        return record is not None and record["status"] in states

    await wait_for(reached, timeout=15)
    record = await db.fetchrow(query, notification_id)
    assert record is not None
    return record


# -- when the settings are saved -------------------------------------------------------------------

REFUSED_HOSTS = ["127.0.0.1", "10.0.0.5", "169.254.169.254", "[::1]", "[::ffff:127.0.0.1]"]


async def test_put_refuses_special_relay_addresses(
    settings_factory: Callable[..., Settings],
) -> None:
    """Promise: a tenant relay at a loopback, private or link-local address, as an IP literal
    or a name that resolves to one, is a 422 naming smtp.host that says how an operator may
    allow it; a name's resolved address is not shown; nothing is stored."""
    dns = Dns({"relay.tenant.example": ["10.20.30.40"]})
    async with daemon_with(settings_factory(NOTIFYD_TENANT_SECRET_KEY=KEY), dns.resolve) as api:
        for host in [*REFUSED_HOSTS, "relay.tenant.example"]:
            status, problem = await put_smtp(api, host, 25)
            assert status == 422, (host, problem)
            [error] = problem["errors"]
            assert error["field"] == "smtp.host", host
            assert "NOTIFYD_EGRESS_ALLOWED_NETWORKS" in error["message"]
        assert "10.20.30.40" not in error["message"]  # the name's answer stays the operator's
        assert "private address" in error["message"]
        status, shown, _ = await api.get(PATH, tenant=TENANT, user="admin-1", role="admin")
        assert (status, shown["smtp"]) == (200, None)


async def test_put_refuses_a_public_relay_on_a_port_that_is_not_smtp(
    settings_factory: Callable[..., Settings],
) -> None:
    """Promise: a public relay must listen on an SMTP port; another port is a 422 naming
    smtp.port (the issue's "any port": a port scanner of the Internet)."""
    async with daemon_with(settings_factory(NOTIFYD_TENANT_SECRET_KEY=KEY)) as api:
        status, problem = await put_smtp(api, PUBLIC, 6379)
        assert status == 422, problem
        assert [e["field"] for e in problem["errors"]] == ["smtp.port"]
        status, body = await put_smtp(api, PUBLIC, 587)
        assert status == 200, body


async def test_put_accepts_relays_in_networks_the_operator_allowed(
    settings_factory: Callable[..., Settings],
) -> None:
    """Promise: NOTIFYD_EGRESS_ALLOWED_NETWORKS lets exactly those networks through, at any
    port; a name that does not resolve is stored (DNS may come later; every connection checks
    again)."""
    settings = settings_factory(
        NOTIFYD_TENANT_SECRET_KEY=KEY, NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.0/8,::1"
    )
    async with daemon_with(settings, Dns().resolve) as api:
        for host in ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"]:
            status, body = await put_smtp(api, host, 10025)
            assert status == 200, (host, body)
        status, problem = await put_smtp(api, "10.0.0.5", 25)
        assert (status, problem["errors"][0]["field"]) == (422, "smtp.host")
        status, body = await put_smtp(api, "not-yet.tenant.example", 587)
        assert status == 200, body


# -- when a connection is opened -------------------------------------------------------------------


async def test_dns_rebinding_is_refused_at_connection_time_and_the_global_relay_still_works(
    settings_factory: Callable[..., Settings],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Promise: a relay name that resolved to a public address when its settings were saved
    and resolves to loopback later is refused when a connection is opened (the delivery fails
    with the egress policy's reason, nothing reaches the loopback service), while another
    tenant's mail through the operator's relay on loopback is delivered."""
    caplog.set_level(logging.WARNING, logger="notifyd.providers.smtp")
    with SmtpSink() as internal, SmtpSink() as operator_relay:
        settings = settings_factory(
            NOTIFYD_TENANT_SECRET_KEY=KEY,
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(operator_relay.port),
            # the public address must be on an allowed port: the internal sink's
            NOTIFYD_EGRESS_ALLOWED_PORTS=str(internal.port),
            **FAST,
        )
        dns = Dns({"relay.tenant.example": [PUBLIC]})
        async with daemon_with(settings, dns.resolve) as api:
            status, body = await put_smtp(api, "relay.tenant.example", internal.port)
            assert status == 200, body
            dns.answers["relay.tenant.example"] = ["127.0.0.1"]  # the rebinding
            refused = await send(api, TENANT)
            delivered = await send(api, OTHER)
            record = await settled(db, refused, "failed")
            await settled(db, delivered, "sent")
    assert "egress policy" in record["last_error"]
    assert "loopback" in record["last_error"]
    assert "127.0.0.1" not in record["last_error"]
    assert internal.sessions == 0 and internal.received == []
    assert len(operator_relay.received) == 1
    assert dns.asked.count("relay.tenant.example") >= 2  # resolved again to connect
    # the operator's log has what the tenant is not told: the address, and whose relay
    [logged] = [r for r in caplog.records if r.getMessage().startswith("tenant SMTP relay")]
    assert (logged.__dict__["tenant_id"], logged.__dict__["address"]) == (TENANT, "127.0.0.1")


async def test_the_provider_connects_to_the_address_it_checked(
    settings_factory: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    """Promise: the connection goes to the address the policy checked, not to the name
    resolved again by someone else: a name only the policy's resolver knows (the system's
    cannot resolve it) reaches the relay it was checked for."""
    with SmtpSink() as relay:
        settings = settings_factory(
            NOTIFYD_TENANT_SECRET_KEY=KEY, NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.0/8", **FAST
        )
        dns = Dns({"relay.tenant.invalid": ["127.0.0.1"]})
        async with daemon_with(settings, dns.resolve) as api:
            status, body = await put_smtp(api, "relay.tenant.invalid", relay.port)
            assert status == 200, body
            notification_id = await send(api, TENANT)
            await settled(db, notification_id, "sent")
        [received] = await asyncio.to_thread(relay.wait_for, 1)
    assert received.notifyd_id == notification_id


# -- what last_error says --------------------------------------------------------------------------


@asynccontextmanager
async def fake_service(
    greeting: bytes, on_line: Callable[[bytes], bytes | None] | None = None
) -> AsyncIterator[int]:
    """A TCP service on loopback that is not (quite) a mail relay: it says `greeting`, then
    answers each line with `on_line(line)` (None: hangs up)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(greeting)
            await writer.drain()
            while on_line is not None:
                line = await reader.readline()
                answer = on_line(line) if line else None
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def delivery() -> Delivery:
    return Delivery(
        id="00000000-0000-7000-8000-000000000001",
        tenant_id=TENANT,
        channel="email",
        recipient="candidate@example.com",
        user_id=None,
        subject="Hi",
        body="Hello",
        html_body=None,
        category=None,
        attempt=1,
        created_at=datetime.now(UTC),
    )


async def reason_of(relay: Relay, timeout: float = 2) -> ProviderError:
    """The error a send through `relay` ends with (loopback allowed, as for an operator's
    internal relay: what is checked here is what comes back, not the policy)."""

    async def config_for(tenant_id: str) -> Relay:
        return relay

    loopback = Egress(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    provider = SmtpProvider(config_for, connections_per_config=1, timeout=timeout, egress=loopback)
    try:
        with pytest.raises(ProviderError) as caught:
            await provider.send(delivery())
    finally:
        await provider.close()
    return caught.value


def ehlo_refused(line: bytes) -> bytes:
    return f"500 5.5.1 {SECRET} does not know {line[:20]!r}\r\n".encode()


@pytest.mark.parametrize(
    ("greeting", "on_line", "expected", "kind"),
    [
        (
            f"HTTP/1.1 400 Bad Request\r\nServer: {SECRET}\r\n\r\n".encode(),
            None,
            "answer is not SMTP",
            TransientError,
        ),
        (f"SSH-2.0-OpenSSH_9.6 {SECRET}\r\n".encode(), None, "not SMTP", TransientError),
        (
            f"554-secret banner of {SECRET}\r\n554 go away\r\n".encode(),
            None,
            "SMTP 554 at greeting (transaction failed)",
            PermanentError,
        ),
        (
            f"220-secret banner of {SECRET}\r\n220 ready\r\n".encode(),
            ehlo_refused,
            "SMTP 500 5.5.1 at EHLO (syntax error, command unrecognized)",
            PermanentError,
        ),
        (
            f"220 {SECRET} ready\r\n".encode(),
            None,
            "closed the connection",
            TransientError,
        ),
    ],
)
async def test_last_error_never_quotes_a_foreign_service(
    greeting: bytes,
    on_line: Callable[[bytes], bytes | None] | None,
    expected: str,
    kind: type[ProviderError],
) -> None:
    """Promise: a connection-phase failure says what failed in notifyd's words: a service that
    is not a mail relay (or a relay before the mail transaction) is never quoted."""
    async with fake_service(greeting, on_line) as port:
        error = await reason_of(Relay("127.0.0.1", port))
    assert isinstance(error, kind), error.reason
    assert expected in error.reason
    assert SECRET not in error.reason and "banner" not in error.reason


async def test_last_error_of_a_row_does_not_carry_a_foreign_banner(
    settings_factory: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    """Promise, end to end: the notification's `last_error`, which the tenant reads, says the
    answer was not SMTP and carries nothing of what the internal service said."""
    banner = f"HTTP/1.1 400 Bad Request\r\nServer: {SECRET}\r\n\r\n".encode()
    async with fake_service(banner) as port:
        settings = settings_factory(
            NOTIFYD_TENANT_SECRET_KEY=KEY, NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.1", **FAST
        )
        async with daemon_with(settings) as api:
            status, body = await put_smtp(api, "127.0.0.1", port)
            assert status == 200, body
            record = await settled(db, await send(api, TENANT), "failed")
    assert "not SMTP" in record["last_error"]
    assert SECRET not in record["last_error"] and "HTTP" not in record["last_error"]


async def test_last_error_names_refused_connections_and_tls_failures() -> None:
    """Promise: a closed port is "connection refused", TLS to a relay that does not speak it
    "TLS failed", a relay that never greets "timed out", each without the server's words."""
    async with fake_service(b"") as port:
        pass  # closed again: nothing listens on `port` now
    refused = await reason_of(Relay("127.0.0.1", port))
    assert isinstance(refused, TransientError)
    assert refused.reason == "connection to the SMTP relay refused"
    with SmtpSink() as plain:
        tls = await reason_of(Relay("127.0.0.1", plain.port, use_ssl=True))
    assert tls.reason.startswith("TLS failed"), tls.reason

    async def never_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # until the client gives up and hangs up
        finally:
            writer.close()

    silent = await asyncio.start_server(never_greet, "127.0.0.1", 0)
    try:
        port = silent.sockets[0].getsockname()[1]
        timed_out = await reason_of(Relay("127.0.0.1", port), timeout=0.3)
    finally:
        silent.close()
        await silent.wait_closed()
    assert isinstance(timed_out, TransientError)
    assert timed_out.reason == "timed out connecting to the SMTP relay or waiting for its greeting"


async def test_transaction_replies_keep_their_text_on_one_bounded_line() -> None:
    """Promise: a relay's reply to RCPT TO keeps its code, enhanced code and text (the
    tenant's own relay saying why), on one line of printable ASCII, bounded in length."""
    with SmtpSink() as relay:
        relay.refuse_rcpt("candidate@example.com", "550 5.1.1 No such user \x1b[31m" + "x" * 400)
        error = await reason_of(Relay("127.0.0.1", relay.port))
    assert isinstance(error, PermanentError)
    assert error.reason.startswith("SMTP 550 at RCPT TO: 5.1.1 No such user ?[31m")
    assert len(error.reason) < 260 and error.reason.isprintable()


async def test_a_refused_relay_is_never_connected_to() -> None:
    """Promise: the provider checks before it connects: a tenant relay on loopback, with the
    default policy, fails for good with the policy's reason and the relay sees no session."""
    with SmtpSink() as relay:

        async def config_for(tenant_id: str) -> Relay:
            return Relay("127.0.0.1", relay.port)

        provider = SmtpProvider(config_for, connections_per_config=1, timeout=2, egress=Egress())
        try:
            with pytest.raises(PermanentError, match=r"egress policy: 127\.0\.0\.1 is a loopback"):
                await provider.send(delivery())
        finally:
            await provider.close()
        assert relay.sessions == 0


async def test_the_system_resolver_runs_on_threads_of_its_own() -> None:
    """Promise: a name goes through the OS resolver (here /etc/hosts' localhost, and the
    numeric spellings inet_aton reads: all loopback, refused), on the policy's own threads,
    not the loop's shared executor that the operator's relay and Twilio need."""
    policy = Egress()
    try:
        for host in ("localhost", "127.1", "2130706433", "0x7f000001"):
            with pytest.raises(EgressRefused, match=f"{host} resolves to a loopback address"):
                await policy.check(host, 25)
        names = [thread.name for thread in threading.enumerate()]
        assert any(name.startswith("notifyd-egress") for name in names), names
    finally:
        policy.close()


def test_refusal_is_an_egress_error_with_the_field() -> None:
    refused = Egress().refusal("10.1.2.3", ipaddress.ip_address("10.1.2.3"), 25)
    assert isinstance(refused, EgressRefused)
    assert refused.message.startswith("10.1.2.3 is a private address")


# -- TLS is verified against the name -----------------------------------------------------------

RELAY_NAME = "relay.tenant.invalid"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A test CA (ca.pem) and a certificate for RELAY_NAME only, with its key (relay.pem)."""
    now = datetime.now(UTC)
    start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "notifyd test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    relay = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, RELAY_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(RELAY_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, relay_file = folder / "ca.pem", folder / "relay.pem"
    ca_file.write_bytes(_pem(ca))
    relay_file.write_bytes(
        _pem(relay)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_file, relay_file


class _Accept:
    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope.content)
        return "250 OK"


@contextmanager
def tls_relay(certificate: Path, *, implicit: bool) -> Iterator[tuple[int, _Accept]]:
    """An SMTP relay on loopback presenting a certificate for RELAY_NAME: implicit TLS, or
    STARTTLS (required)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    handler = _Accept()
    port = free_port()
    tls: dict[str, Any] = (
        {"ssl_context": context} if implicit else {"tls_context": context, "require_starttls": True}
    )
    controller = SessionsController(handler, hostname="127.0.0.1", port=port, **tls)
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-tls", "starttls"])
async def test_tls_is_verified_against_the_relay_name_not_the_address(
    implicit: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Promise: connecting to the checked address keeps certificate verification against
    the host name the tenant gave: a relay whose certificate names RELAY_NAME is reached by
    that name (through the address the policy checked), and the same relay named by its IP
    address fails verification."""
    ca_file, certificate = make_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # read by ssl.create_default_context
    dns = Dns({RELAY_NAME: ["127.0.0.1"]})
    policy = Egress(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),), resolver=dns.resolve)
    tls = {"use_ssl": True} if implicit else {"use_tls": True}
    with tls_relay(certificate, implicit=implicit) as (port, handler):
        relays = {
            "by-name": Relay(RELAY_NAME, port, **tls),
            "by-ip": Relay("127.0.0.1", port, **tls),
        }

        async def config_for(tenant_id: str) -> Relay:
            return relays[tenant_id]

        provider = SmtpProvider(config_for, connections_per_config=1, timeout=3, egress=policy)
        try:
            item = delivery()
            item.tenant_id = "by-name"
            await provider.send(item)
            item.tenant_id = "by-ip"
            with pytest.raises(TransientError) as caught:
                await provider.send(item)
        finally:
            await provider.close()
    assert len(handler.received) == 1
    assert caught.value.reason.startswith("TLS failed: the relay's certificate did not verify")
    assert "mismatch" in caught.value.reason
