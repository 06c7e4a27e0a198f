"""What every channel provider promises the sender actor.

A provider sends one delivery and either returns a `Sent` or raises one of two errors. The
split is the whole retry policy's input: `TransientError` (connection trouble, SMTP 4xx,
Twilio 429/5xx) is retried with backoff, honouring `retry_after`; `PermanentError` (SMTP 5xx,
an invalid number) fails the delivery at once, because retrying cannot change the answer;
`RecipientRefused` (a `PermanentError`) also puts the address on the suppression list.
`Unreachable` (a `TransientError`) also tells the sender's circuit breaker of the delivery's
`Route` that the relay itself is down, not just this message refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Delivery:
    """One notification row as a provider needs it, content already rendered."""

    id: str
    tenant_id: str
    channel: str
    recipient: str
    user_id: str | None
    subject: str | None
    body: str
    html_body: str | None
    category: str | None
    attempt: int
    created_at: Any
    critical: bool = False  # bypasses opt-outs: and carries no unsubscribe link


class Row(Protocol):
    """A notification row read by column name (an asyncpg Record is one)."""

    def __getitem__(self, column: str, /) -> Any: ...


def delivery_of(
    row: Row, *, subject: str | None, body: str, html: str | None, attempt: int
) -> Delivery:
    """A notification row as a provider sees it, with the content and attempt to send. Here,
    below the sender and the dispatcher's direct in-app path, so both build it one way."""
    return Delivery(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        channel=row["channel"],
        recipient=row["recipient"],
        user_id=row["user_id"],
        subject=subject,
        body=body,
        html_body=html,
        category=row["category"],
        attempt=attempt,
        created_at=row["created_at"],
        critical=bool(row["critical"]),
    )


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Sent:
    """Accepted by the provider; `provider_message_id` links later status callbacks."""

    provider_message_id: str | None = None
    provider_status: str | None = None


class ProviderError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(ProviderError):
    """Worth retrying; `retry_after` (seconds) when the provider said when."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Unreachable(TransientError):
    """The relay or API could not be reached, or did not answer in time (connect, greeting,
    a hung session): counts against its route's circuit breaker. A reply, even a refusal,
    is not this: the relay is alive."""


class PermanentError(ProviderError):
    """Retrying cannot help: the delivery fails now, with this reason."""


class RecipientRefused(PermanentError):
    """The recipient itself is refused for good (a relay's 550-class no to the mailbox,
    Twilio's 21610 for a number that replied STOP): the delivery fails, and the sender puts
    the address on its tenant's suppression list with `suppress_as` (a
    `notifyd.suppressions` reason), so later sends end `suppressed` without a provider call."""

    def __init__(self, reason: str, suppress_as: str) -> None:
        super().__init__(reason)
        self.suppress_as = suppress_as


@dataclass(frozen=True, slots=True)
class Route:
    """Where a tenant's deliveries go: one circuit breaker per distinct `key`.

    `label` names it in metrics (a tenant id for a tenant's own relay or account, "global"
    for the platform's: bounded by the number of tenants, never a hostname); `display` is
    what that tenant may read in `last_error`.
    """

    key: object
    label: str
    display: str


class Provider(Protocol):
    channel: str

    async def send(self, delivery: Delivery) -> Sent: ...

    async def route(self, tenant_id: str) -> Route | None:
        """The tenant's relay or account (None: no breaker, e.g. in-app)."""
        ...

    async def close(self) -> None: ...
