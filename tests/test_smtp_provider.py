"""The SMTP provider against real SMTP servers: connection reuse follows the configuration."""

from __future__ import annotations

import asyncio
import email
from dataclasses import replace
from datetime import UTC, datetime
from email.policy import default

import pytest

from notifyd.providers.base import Delivery, PermanentError
from notifyd.providers.smtp import SmtpProvider, build_message
from tests.helpers import wait_for
from tests.smtp_sink import Relay, SmtpSink


def delivery(n: int, tenant: str = "TEN-A") -> Delivery:
    return Delivery(
        id=f"00000000-0000-7000-8000-{n:012d}",
        tenant_id=tenant,
        channel="email",
        recipient=f"c{n}@example.com",
        user_id=None,
        subject="Hi",
        body="Hello",
        html_body=None,
        category=None,
        attempt=1,
        created_at=datetime.now(UTC),
    )


async def test_a_tenant_that_moves_to_another_relay_closes_its_old_connections() -> None:
    """Connections are reused per relay configuration; when a tenant's configuration changes
    (another host or credentials), the old relay's idle connections are closed, not leaked."""
    with SmtpSink() as old, SmtpSink() as new:
        relays = {"TEN-A": Relay("127.0.0.1", old.port)}

        async def config_for(tenant_id: str) -> Relay:
            return relays[tenant_id]

        provider = SmtpProvider(config_for, connections_per_config=2, timeout=5)
        try:
            await provider.send(delivery(1))
            await provider.send(delivery(2))
            assert (old.sessions, old.quits) == (1, 0)  # one connection, reused
            relays["TEN-A"] = Relay("127.0.0.1", new.port)
            await provider.send(delivery(3))

            async def old_closed() -> bool:
                return old.quits == 1

            await wait_for(old_closed, timeout=10)
            assert new.sessions == 1
            assert len(await asyncio.to_thread(new.wait_for, 1)) == 1
        finally:
            await provider.close()


async def test_after_a_relay_restart_the_next_send_goes_through_at_once() -> None:
    """Every pooled connection died with the relay. The send that finds the first dead one
    must not try the others one by one (each failure costs a retry with backoff): it opens a
    new connection and the message goes out in that same call."""
    with SmtpSink() as relay:

        async def config_for(tenant_id: str) -> Relay:
            return Relay("127.0.0.1", relay.port)

        provider = SmtpProvider(config_for, connections_per_config=4, timeout=5)
        try:
            await asyncio.gather(*(provider.send(delivery(n)) for n in range(4)))
            assert relay.sessions == 4  # four connections, idle in the pool now
            await asyncio.to_thread(relay.restart)
            for n in range(4, 8):
                await provider.send(delivery(n))  # raises if it gives up
            assert len(await asyncio.to_thread(relay.wait_for, 8)) == 8
        finally:
            await provider.close()


def test_built_messages_read_back_as_written_and_refuse_injected_headers() -> None:
    """Non-ASCII subject and display name, HTML alternative, one Message-ID per
    notification (the same on a resend); a line break in a header is refused, not sent."""
    item = delivery(7)
    rich = replace(item, subject="Entrevista amanhã às 10h ✓", html_body="<p>Olá</p>")
    built = build_message(rich, "Recrutamento Ção <hr@example.com>", "https://x.example/u?id=1")
    parsed = email.message_from_bytes(built.data, policy=default)
    assert parsed["Subject"] == "Entrevista amanhã às 10h ✓"
    assert parsed["From"].addresses[0].display_name == "Recrutamento Ção"
    assert parsed["From"].addresses[0].addr_spec == "hr@example.com"
    assert parsed["To"] == rich.recipient
    assert parsed["List-Unsubscribe"] == "<https://x.example/u?id=1>"
    assert (
        parsed["Message-ID"] == built.message_id == build_message(rich, "hr@example.com").message_id
    )
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    html = parsed.get_body(("html",))
    assert html is not None and html.get_content().strip() == "<p>Olá</p>"
    assert built.sender == "hr@example.com"
    with pytest.raises(PermanentError, match="line break"):
        build_message(replace(item, subject="Hi\r\nBcc: victim@example.com"), "hr@example.com")
    with pytest.raises(PermanentError, match="line break"):
        build_message(item, "hr@example.com\r\nBcc: x@example.com")
