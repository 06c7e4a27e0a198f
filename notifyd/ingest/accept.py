"""Accepting a domain event: deduplicated, then stored and enqueued exactly as a POST is.

Each recipient and channel becomes an `Order` on `notifyd.accept`'s path, the one every
notification takes into the outbox: the same checks, SMS numbers in E.164 in the tenant's
region, the content rendered now (a template that cannot render makes the event malformed,
never a blank in someone's inbox), the rows and their audit rows, then the intents after the
commit (a Redis failure there leaves the rows to the sweeper).

An event naming a `workflow` starts its runs instead, through the trigger's one rule
(`workflows.start_runs`, as `POST /workflows/{key}/trigger/` does): the runs, their steps and
the `workflow.trigger` audit row in the transaction that holds the deduplication row, then
the steps on the timer wheel. A workflow the tenant does not have makes the event
malformed (`workflow`), dead-lettered for `notifyd dlq requeue` once it exists.

Deduplication is one row per (tenant, event id) in `ingested_events`, inserted in the same
transaction as the notifications (or runs) with `ON CONFLICT DO NOTHING`: whichever of two
deliveries of an event (a replay, a second instance, a publisher that sent it twice) commits
first makes the notifications; the other finds the row, writes nothing and is acknowledged.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from notifyd.accept.orders import Order, Refused, order_problems
from notifyd.accept.outbox import announce
from notifyd.accept.prepare import Prepared, prepare
from notifyd.accept.rows import authored
from notifyd.ingest.events import DomainEvent, MalformedEvent, Recipient, WorkflowEvent
from notifyd.keys import Keys
from notifyd.limits import platform_quota
from notifyd.metrics import Metrics
from notifyd.ratelimit import Limiter
from notifyd.schemas.errors import FieldError
from notifyd.schemas.registry import Schemas
from notifyd.settings import CHANNELS, Settings
from notifyd.store import audit
from notifyd.store import workflows as workflow_store
from notifyd.store.audit import Author
from notifyd.store.limits import TenantLimits
from notifyd.store.notifications import insert_many_audited
from notifyd.store.pool import Executor
from notifyd.store.tenants import TenantSettings, load_redacted
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.workflows import put_on_wheel, start_runs

log = logging.getLogger("notifyd.ingest")

SOURCES = ("redis", "rabbitmq", "kafka")

INSERT_EVENT = """
INSERT INTO ingested_events (tenant_id, event_id, event_type, source, notification_ids)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, event_id) DO NOTHING
RETURNING received_at
"""

SEEN = "SELECT notification_ids FROM ingested_events WHERE tenant_id = $1 AND event_id = $2"

# A recipient's address field for each channel, to name it in a reason.
_ADDRESS_FIELD = {"email": "email", "sms": "phone", "in_app": "user_id"}


@dataclass(frozen=True, slots=True)
class Outcome:
    duplicate: bool
    notification_ids: tuple[uuid.UUID, ...]
    enqueued: bool = True  # False: stored, but Redis failed; the sweeper enqueues them later
    run_ids: tuple[uuid.UUID, ...] = ()  # an event naming a workflow: the runs it started


@dataclass(frozen=True, slots=True)
class _Planned:
    index: int  # the recipient's position in the event, to name it in a reason
    order: Order


def creator(event: DomainEvent | WorkflowEvent) -> str:
    """The rows' `created_by`: what made them, as the REST API shows it (`event:<type>`)."""
    return f"event:{event.type}"


def recipient_context(event: DomainEvent, recipient: Recipient) -> dict[str, Any]:
    """The event's context, plus the recipient's own name and time zone when given (their
    values win over the event's keys of the same name: they are the more specific)."""
    extra = {
        key: value
        for key, value in (
            ("recipient_name", recipient.name),
            ("recipient_timezone", recipient.timezone),
        )
        if value is not None
    }
    return {**event.context, **extra} if extra else event.context


def plan(event: DomainEvent) -> list[_Planned]:
    """One order per recipient and channel they have an address for; an address named twice
    on one channel gets one notification."""
    planned: list[_Planned] = []
    seen: set[tuple[str, str]] = set()
    for index, recipient in enumerate(event.recipients):
        context = recipient_context(event, recipient)
        for channel in event.channels or CHANNELS:
            address = recipient.address(channel)
            if address is None or (channel, address) in seen:
                continue
            seen.add((channel, address))
            planned.append(
                _Planned(
                    index,
                    Order(
                        channel=channel,
                        recipient=address,
                        template_key=event.template_key,
                        context=context,
                        user_id=None if channel == "in_app" else recipient.user_id,
                        category=event.category or event.type,
                        critical=event.critical,
                        locale=recipient.locale,
                    ),
                )
            )
    return planned


def _in_event_terms(event: DomainEvent, item: _Planned, refusal: FieldError) -> FieldError:
    """A refusal worded for the REST body (`recipient`, `subject`), said about the event."""
    channel = item.order.channel
    where = f"recipients[{item.index}]"
    if refusal.field == "recipient":
        return FieldError(f"{where}.{_ADDRESS_FIELD[channel]}", refusal.message)
    if refusal.field in ("user_id", "locale"):
        return FieldError(f"{where}.{refusal.field}", refusal.message)
    if refusal.field == "subject":
        return FieldError(
            "template_key", f"template {event.template_key!r} has no subject for email"
        )
    if refusal.field in ("text_body", "html_body"):  # the stored template itself is broken
        return FieldError("template_key", refusal.message)
    return refusal


class EventAcceptor:
    """Dedupe, check and render, store (with the dedupe row) in one transaction, enqueue."""

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        producer: Producer,
        keys: Keys,
        settings: Settings,
        metrics: Metrics | None = None,
        limiter: Limiter | None = None,
        tenant_limits: TenantLimits | None = None,
        schedule: Schedule | None = None,
        tenant_settings: Callable[[str], Awaitable[TenantSettings]] | None = None,
    ) -> None:
        """`schedule`: the timer wheel, for the steps of events naming a workflow (None:
        their steps wait for the sweeper's overdue check). `tenant_settings`: a tenant's
        settings without its secrets, the tenant configuration source's over the stored ones
        (by default the stored ones); a source that has nothing yet raises, and the event is
        retried like a database error."""
        self._tenant_settings = tenant_settings
        self._pool = pool
        self._schedule = schedule
        self._limiter = limiter
        self._tenant_limits = tenant_limits
        self._producer = producer
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._send = Schemas.build(settings).send  # the REST body's model, built once

    async def accept(self, event: DomainEvent | WorkflowEvent, *, source: str) -> Outcome:
        """Store the event's notifications (or start its workflow's runs) once;
        `MalformedEvent` when it can never be accepted (nothing stored). Database errors
        propagate: the source retries later."""
        if source not in SOURCES:
            raise ValueError(f"unknown event source {source!r}")
        if isinstance(event, WorkflowEvent):
            return await self._trigger(event, source)
        known = await _seen(self._pool, event)
        if known is not None:  # the common replay: skip the rendering
            log.info("duplicate event ignored", extra=_log_fields(event, source))
            return Outcome(duplicate=True, notification_ids=known)
        # region and locale only: nothing here needs the tenant's secrets
        if self._tenant_settings is not None:
            tenant = await self._tenant_settings(event.tenant_id)
        else:
            tenant = (await load_redacted(self._pool, event.tenant_id)).settings
        prepared = await self._prepare(event, tenant)
        await self._check_quotas(event, tenant, prepared)
        author = Author(
            user_id=creator(event),
            details={
                "via": "ingest",
                "source": source,
                "event_id": event.event_id,
                "event_type": event.type,
            },
        )
        rows, entries = authored(prepared, event.tenant_id, author)
        ids = tuple(row.id for row in rows)
        async with self._pool.acquire() as conn, conn.transaction():
            received = await conn.fetchval(
                INSERT_EVENT, event.tenant_id, event.event_id, event.type, source, list(ids)
            )
            if received is None:
                # a peer (or the same event published twice) committed first: write nothing
                log.info("duplicate event ignored", extra=_log_fields(event, source))
                return Outcome(duplicate=True, notification_ids=await _seen(conn, event) or ())
            await insert_many_audited(conn, rows, entries)
        enqueued = await announce(self._producer, self._keys, rows, self._metrics)
        log.info("event accepted", extra={**_log_fields(event, source), "notifications": len(rows)})
        return Outcome(duplicate=False, notification_ids=ids, enqueued=enqueued)

    async def _trigger(self, event: WorkflowEvent, source: str) -> Outcome:
        """The workflow's runs, started as a trigger over REST starts them, once."""
        known = await _seen(self._pool, event)
        if known is not None:
            log.info("duplicate event ignored", extra=_log_fields(event, source))
            return Outcome(duplicate=True, notification_ids=known)
        found = await workflow_store.get(self._pool, event.tenant_id, event.workflow_key)
        if found is None:
            raise MalformedEvent([FieldError("workflow", "the tenant has no workflow of that key")])
        details = {
            "via": "ingest",
            "source": source,
            "event_id": event.event_id,
            "event_type": event.type,
        }
        author = Author(user_id=creator(event), details=details)
        async with self._pool.acquire() as conn, conn.transaction():
            received = await conn.fetchval(
                INSERT_EVENT, event.tenant_id, event.event_id, event.type, source, []
            )
            if received is None:
                log.info("duplicate event ignored", extra=_log_fields(event, source))
                return Outcome(duplicate=True, notification_ids=())
            started = await start_runs(
                conn,
                tenant_id=event.tenant_id,
                key=event.workflow_key,
                stored=found["definition"],
                trigger=event.trigger,
                created_by=author.user_id,
                digest_max_items=self._settings.workflow_digest_max_items,
            )
            await audit.record(
                conn,
                author.entry(
                    event.tenant_id,
                    "workflow.trigger",
                    started.audit_details(event.workflow_key, event.trigger),
                ),
            )
        if self._schedule is not None:
            await put_on_wheel(self._schedule, self._keys, started)
        run_ids = tuple(dict.fromkeys(started.run_of[r] for r in started.recipients))
        log.info("event accepted", extra={**_log_fields(event, source), "runs": len(run_ids)})
        return Outcome(duplicate=False, notification_ids=(), run_ids=run_ids)

    async def _check_quotas(
        self, event: DomainEvent, tenant: TenantSettings, prepared: list[Prepared]
    ) -> None:
        """Each email and SMS through the platform's relay or Twilio account counts against
        the tenant's daily quota, as a REST send does; past it the event is dead-lettered
        with the reason (nothing stored), for `notifyd dlq requeue` once the day is over."""
        if self._limiter is None or self._tenant_limits is None:
            return
        limits = self._tenant_limits.of(event.tenant_id)
        for item in prepared:
            channel = item.order.channel
            quota = platform_quota(
                limits,
                channel,
                own_smtp=tenant.smtp is not None,
                own_twilio=tenant.twilio is not None,
            )
            refusal = await self._limiter.check_quota(channel, event.tenant_id, quota)
            if refusal is not None:
                if self._metrics is not None:
                    self._metrics.limit_refusals.labels(refusal.limit).inc()
                raise MalformedEvent(
                    [FieldError("channels", f"{refusal.detail}; requeue it after 00:00 UTC")]
                )

    async def _prepare(self, event: DomainEvent, tenant: TenantSettings) -> list[Prepared]:
        """Every planned notification checked and rendered, or `MalformedEvent`.

        Without `channels`, a channel the tenant has no template for is skipped (a template
        for email only is a choice, not an error); with them, it makes the event malformed.
        """
        planned = plan(event)
        if not planned:
            wanted = ", ".join(event.channels or CHANNELS)
            raise MalformedEvent(
                [FieldError("recipients", f"none has an address for the channels ({wanted})")]
            )
        prepared: list[Prepared] = []
        without_template: set[str] = set()
        for item in planned:
            if item.order.channel in without_template:
                continue
            # checked with the event's own context: the recipient's name and time zone
            # added to it do not count against the publisher's NOTIFYD_CONTEXT_MAX_KEYS
            as_published = replace(item.order, context=event.context)
            found = order_problems(as_published, self._send)
            if found:
                raise MalformedEvent([_in_event_terms(event, item, p) for p in found])
            try:
                prepared.append(
                    await prepare(self._pool, self._settings, tenant, event.tenant_id, item.order)
                )
            except Refused as exc:
                if event.channels is None and _only_missing_template(exc.problems):
                    without_template.add(item.order.channel)
                    continue
                raise MalformedEvent(
                    [_in_event_terms(event, item, p) for p in exc.problems]
                ) from None
        if not prepared:
            raise MalformedEvent(
                [
                    FieldError(
                        "template_key",
                        f"unknown template_key {event.template_key!r} for every channel the "
                        f"recipients have an address for ({', '.join(sorted(without_template))})",
                    )
                ]
            )
        return prepared


def _only_missing_template(found: Sequence[FieldError]) -> bool:
    """`compose` names `template_key` only when there is no template at all for the channel
    (a broken or unrenderable template names its source field or `context`)."""
    return [p.field for p in found] == ["template_key"]


async def _seen(
    executor: Executor, event: DomainEvent | WorkflowEvent
) -> tuple[uuid.UUID, ...] | None:
    ids = await executor.fetchval(SEEN, event.tenant_id, event.event_id)
    return None if ids is None else tuple(ids)


def _log_fields(event: DomainEvent | WorkflowEvent, source: str) -> dict[str, Any]:
    return {
        "tenant_id": event.tenant_id,
        "event_id": event.event_id,
        "event_type": event.type,
        "source": source,
    }
