"""Which tenants an event source may publish for, and whether its events may be `critical`.

An event names its own tenant, and whoever can write to the Redis stream or the RabbitMQ
queue could otherwise act as any tenant: send with that tenant's templates and relay, and
mark the sends `critical` so no opt-out silences them. The operator binds each source
(`NOTIFYD_EVENTS_TENANTS` / `NOTIFYD_EVENTS_ALLOW_CRITICAL` for the Redis stream,
`NOTIFYD_RABBITMQ_TENANTS` / `NOTIFYD_RABBITMQ_ALLOW_CRITICAL` for RabbitMQ,
`NOTIFYD_KAFKA_TENANTS` / `NOTIFYD_KAFKA_ALLOW_CRITICAL` for Kafka); `admit` is
the one rule every source applies to a parsed event before anything is read or written for
it. An event outside its source's binding is refused like a malformed one: dead-lettered
with the reason, nothing stored, never retried (publishing it again cannot change the
answer).

`critical` beyond the binding is refused, not sent as non-critical: quietly dropping the
flag would deliver a notification its publisher meant to bypass opt-outs to no one who
opted out, with nothing said; the dead letter tells the publisher and the operator.

RabbitMQ can say more: who published. The broker refuses a message whose AMQP `user_id`
property is not the user its publisher logged in as, so with
`NOTIFYD_RABBITMQ_USER_TENANTS` (`svc-a=TEN-1,TEN-2;svc-b=*`) each broker user gets its own
tenants, and a message must carry its `user_id` (one without could come from anyone). The
Redis stream cannot tell who wrote an entry, so it has only the source-wide list.

The defaults are `*` (every tenant) and critical allowed, as before the binding existed:
existing publishers send for many tenants, and closing the sources by default would
dead-letter their events on upgrade. `notifyd check-config` warns about every open source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from notifyd.ingest.events import DomainEvent, MalformedEvent, WorkflowEvent
from notifyd.schemas.errors import FieldError
from notifyd.settings import Settings

ALL_TENANTS = "*"


@dataclass(frozen=True, slots=True)
class Binding:
    """What one source may publish; its settings' names, to name them in a reason."""

    source: str  # "redis", "rabbitmq" or "kafka", as `EventAcceptor.accept` names sources
    tenants: frozenset[str] | None  # None: every tenant
    allow_critical: bool
    tenants_setting: str
    critical_setting: str
    # RabbitMQ only: broker user → its tenants ("*": all); None: publishers not told apart
    users: Mapping[str, frozenset[str]] | None = None

    @classmethod
    def for_source(cls, settings: Settings, source: str) -> Binding:
        if source == "redis":
            listed, critical = settings.events_tenants, settings.events_allow_critical
            names = ("NOTIFYD_EVENTS_TENANTS", "NOTIFYD_EVENTS_ALLOW_CRITICAL")
        elif source == "rabbitmq":
            listed, critical = settings.rabbitmq_tenants, settings.rabbitmq_allow_critical
            names = ("NOTIFYD_RABBITMQ_TENANTS", "NOTIFYD_RABBITMQ_ALLOW_CRITICAL")
        elif source == "kafka":
            listed, critical = settings.kafka_tenants, settings.kafka_allow_critical
            names = ("NOTIFYD_KAFKA_TENANTS", "NOTIFYD_KAFKA_ALLOW_CRITICAL")
        else:
            raise ValueError(f"unknown event source {source!r}")
        tenants = None if ALL_TENANTS in listed else frozenset(listed)
        users = settings.rabbitmq_user_tenants if source == "rabbitmq" else None
        return cls(source, tenants, critical, *names, users=users or None)

    @property
    def open_to_all(self) -> bool:
        return self.tenants is None


class EventNotAllowed(MalformedEvent):
    """The event is well formed, but its source may not publish it: dead-lettered with the
    reason, like a malformed event (the same handling in both sources)."""


def admit(
    event: DomainEvent | WorkflowEvent, binding: Binding, publisher: str | None = None
) -> None:
    """Raises `EventNotAllowed` naming each field beyond `binding`; returns when allowed.
    `publisher`: the broker user that published it (RabbitMQ's checked `user_id`), if any.

    The tenant id is quoted in the reason: it is no one's personal data, and the operator
    reading the dead letter needs it to decide whether the binding or the publisher is wrong.
    """
    problems: list[FieldError] = []
    if binding.tenants is not None and event.tenant_id not in binding.tenants:
        problems.append(
            FieldError(
                "tenant_id",
                f"the {binding.source} source may not publish for tenant {event.tenant_id!r} "
                f"(not in {binding.tenants_setting})",
            )
        )
    if binding.users is not None:
        problems += _publisher_problems(event, binding.users, publisher)
    if event.critical and not binding.allow_critical:
        problems.append(
            FieldError(
                "critical",
                f"the {binding.source} source may not send critical events "
                f"({binding.critical_setting} is false)",
            )
        )
    if problems:
        raise EventNotAllowed(problems)


def _publisher_problems(
    event: DomainEvent | WorkflowEvent, users: Mapping[str, frozenset[str]], publisher: str | None
) -> list[FieldError]:
    setting = "NOTIFYD_RABBITMQ_USER_TENANTS"
    if not publisher:
        return [
            FieldError(
                "user_id",
                f"the message has no AMQP user_id property; {setting} requires it (set it to "
                "the user you connect as: the broker checks it)",
            )
        ]
    tenants = users.get(publisher)
    if tenants is None:
        return [FieldError("user_id", f"RabbitMQ user {publisher!r} is not in {setting}")]
    if ALL_TENANTS not in tenants and event.tenant_id not in tenants:
        return [
            FieldError(
                "tenant_id",
                f"RabbitMQ user {publisher!r} may not publish for tenant {event.tenant_id!r} "
                f"(not in its {setting} list)",
            )
        ]
    return []


def open_sources(settings: Settings) -> list[str]:
    """A warning for each running source that any tenant may publish through, for
    `notifyd check-config`."""
    if not settings.events_enabled:
        return []
    running = [("redis", "the Redis stream <prefix>:events")]
    if settings.rabbitmq_url:
        running.append(("rabbitmq", f"the RabbitMQ queue {settings.rabbitmq_queue}"))
    if settings.kafka_bootstrap_servers:
        running.append(("kafka", f"the Kafka topics {', '.join(settings.kafka_topics)}"))
    warnings = []
    for source, where in running:
        binding = Binding.for_source(settings, source)
        if binding.open_to_all and binding.users is None:
            warnings.append(
                f"{binding.tenants_setting}: is * — whoever can publish to {where} can send "
                f"as any tenant; list the tenants it serves (docs/limits.md, "
                f'"Ingestion sources and tenants")'
            )
    return warnings
