"""Accepting a notification: the one path from "someone wants this sent" to the outbox.

The REST send route, `notifyd send` and event ingestion all go through here, so a smoke test
from the shell or an ingested event is checked, rendered and stored exactly as a POST is:

1. `problems`: what is wrong with the request, every field at once (the REST body's model,
   `schemas.notifications`; the REST route reads its body into that model itself);
2. `prepare`: SMS numbers to E.164 in the tenant's region and the content rendered now, so a
   number that cannot be read or a template that cannot render is the caller's error, never
   a blank in someone's inbox later;
3. `record`: the row and its audit row, inside the caller's transaction;
4. `announce`: after the commit, the intent on the intents stream. If Redis fails there the
   notification is still accepted (the row is committed) and the sweeper enqueues it later.
   (REST sends without an Idempotency-Key go through `Outbox`, which hands its batches to
   this process's dispatcher instead, and announces only what that cannot take.)

`accept` does all four in one call for callers with nothing else in the transaction (the CLI,
ingestion). The HTTP handler calls the steps itself because it keeps the idempotency record
in the same transaction. Who may send what (the role policy) stays with each entry point:
a token's role means nothing to an operator at a shell.

`restart_failed` is the other half of an admin's requeue (`POST /notifications/{id}/retry/`,
`notifyd dlq requeue`): a failed delivery starts over, audited.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from notifyd.compose import Composer, render_limits
from notifyd.ids import OpaqueIdRule, uuid7
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.payloads import DeliveryRef, NotificationIntent
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.providers.render import Rendered, TemplateError
from notifyd.schemas.errors import FieldError, Invalid
from notifyd.schemas.notifications import NotificationSend
from notifyd.schemas.reader import Reader
from notifyd.schemas.registry import Schemas
from notifyd.settings import Settings
from notifyd.store import audit, deliveries
from notifyd.store import notifications as store
from notifyd.store.audit import AuditEntry
from notifyd.store.batch import GroupCommit
from notifyd.store.pool import Conn, Executor
from notifyd.store.tenants import TenantSettings, load_redacted, locale_for, region_for
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.accept")

SEND_ACTION = "notification.send"
RETRY_ACTION = "notification.retry"


class Refused(Exception):
    """The request cannot be accepted; nothing was stored."""

    def __init__(self, problems: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = list(problems)


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Order:
    """One notification as asked for (the REST body's fields; `channel` is its
    `notification_type`). For in-app, `recipient` is the user id and `user_id` stays None."""

    channel: str
    recipient: str
    subject: str | None = None
    message: str | None = None
    template_key: str | None = None
    context: dict[str, Any] | None = None
    user_id: str | None = None
    category: str | None = None
    critical: bool = False
    locale: str | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who accepts: the row's `created_by` and the audit row's user, plus what the audit row
    says about the source (`{"via": "cli"}`, `{"via": "ingest", "event_id": …}`)."""

    user_id: str
    details: Mapping[str, Any] = field(default_factory=dict)
    ip_address: str | None = None
    request_id: str | None = None

    def audit(self, tenant_id: str, action: str, details: Mapping[str, Any]) -> AuditEntry:
        return AuditEntry(
            tenant_id=tenant_id,
            user_id=self.user_id,
            action=action,
            ip_address=self.ip_address,
            request_id=self.request_id,
            details={**self.details, **details},
        )


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Prepared:
    """An order that passed every check: recipient normalised, content rendered."""

    order: Order
    recipient: str
    rendered: Rendered

    def row(
        self,
        *,
        tenant_id: str,
        created_by: str,
        idempotency_key: str | None = None,
        request_id: str | None = None,
    ) -> store.NewNotification:
        order = self.order
        return store.NewNotification(
            id=uuid7(),
            tenant_id=tenant_id,
            created_by=created_by,
            user_id=self.recipient if order.channel == "in_app" else order.user_id,
            channel=order.channel,
            recipient=self.recipient,
            subject=self.rendered.subject,
            body=self.rendered.text,
            html_body=self.rendered.html,
            template_key=order.template_key,
            context=order.context,
            locale=order.locale,
            category=order.category,
            critical=order.critical,
            idempotency_key=idempotency_key,
            request_id=request_id,
        )


@dataclass(frozen=True, slots=True)
class Accepted:
    ids: list[uuid.UUID]
    enqueued: bool  # False: stored, but Redis failed; the sweeper enqueues them later


def problems(order: Order, send: Reader[NotificationSend]) -> list[FieldError]:
    """Everything wrong with `order`, as the REST route says it about the same body (through
    the same model, `Schemas.send`): for callers whose input did not come through a JSON body
    (the CLI, ingested events)."""
    body = {
        "notification_type": order.channel,
        "recipient": order.recipient,
        "subject": order.subject,
        "message": order.message,
        "template_key": order.template_key,
        "context": order.context,
        "user_id": order.user_id,
        "category": order.category,
        "critical": order.critical,
        "locale": order.locale,
    }
    try:
        send.python({k: v for k, v in body.items() if v is not None})
    except Invalid as exc:
        return exc.errors
    return []


async def prepare(
    executor: Executor,
    settings: Settings,
    tenant: TenantSettings,
    tenant_id: str,
    order: Order,
    *,
    composer: Composer | None = None,
) -> Prepared:
    """Normalise the recipient and render the content; `Refused` names the field at fault.

    Only the tenant's region and default locale are used, so `tenant` may be the redacted
    settings (`store.tenants.load_redacted`): nothing here needs a tenant's secrets.
    `composer`: one shared by a batch of orders (each distinct template resolved once; it
    must know the tenant's default locale as `locale_for` gives it).
    """
    recipient = order.recipient.strip()
    if order.channel == "sms":
        # read national forms in the tenant's region now: the row holds the E.164 form the
        # provider and the status callbacks use
        try:
            recipient = to_e164(recipient, region_for(tenant, settings))
        except InvalidPhone as exc:
            raise Refused([FieldError("recipient", str(exc))]) from None
    try:
        if composer is None:
            composer = Composer(
                executor,
                locale_for(tenant, settings),
                limits=render_limits(settings),
                default_locales={tenant_id: locale_for(tenant, settings)},
            )
        rendered = await composer.compose(
            tenant_id=tenant_id,
            channel=order.channel,
            template_key=order.template_key,
            context=order.context,
            subject=order.subject,
            message=order.message,
            locale=order.locale,
        )
    except TemplateError as exc:
        raise Refused([FieldError(exc.field, exc.reason)]) from None
    if order.channel == "email" and not (rendered.subject or "").strip():
        raise Refused([FieldError("subject", "is required for email (directly or by template)")])
    return Prepared(order, recipient, rendered)


def audit_details(row: store.NewNotification) -> dict[str, Any]:
    """What the audit row of a send says (no content: that stays in the row)."""
    return {
        "notification_id": str(row.id),
        "channel": row.channel,
        "recipient": row.recipient,
        "template_key": row.template_key,
    }


async def record(conn: Conn, row: store.NewNotification, entry: AuditEntry) -> None:
    """The outbox row and its audit row; call inside the caller's transaction."""
    await store.insert(conn, row)
    await audit.record(conn, entry)


def count_accepted(metrics: Metrics, rows: Sequence[store.NewNotification]) -> None:
    for channel, count in collections.Counter(row.channel for row in rows).items():
        metrics.notifications_accepted.labels(channel).inc(count)


async def announce(
    producer: Producer,
    keys: Keys,
    rows: Sequence[store.NewNotification],
    metrics: Metrics | None = None,
    *,
    counted: bool = False,
) -> bool:
    """After the commit: count the rows accepted (unless `counted` already) and put their
    intents on the stream. False when Redis failed; the rows stay queued and the sweeper
    enqueues them later."""
    if metrics is not None and not counted:
        count_accepted(metrics, rows)
    try:
        await producer.add_many(
            [
                (keys.intents, NotificationIntent(row.tenant_id, str(row.id)).to_fields())
                for row in rows
            ]
        )
    except RedisError as exc:
        if metrics is not None:
            metrics.enqueue_failures.inc(len(rows))
        log.warning("intents not enqueued; left for the sweeper", extra={"error": repr(exc)})
        return False
    return True


# (tenant, id) of rows just committed → dispatched by this process (raises when it could not)
DispatchNow = Callable[[Sequence[tuple[str, uuid.UUID]]], Awaitable[None]]


class Outbox:
    """Accepted notifications of concurrent requests, written together.

    Each `put` returns once its row and audit row are committed, exactly as `record` would;
    but rows that arrive while a commit is in flight share the next transaction (an
    `executemany` of rows, one of audit rows). Under load that turns the round trips per
    request into round trips per batch of up to `max_batch`. Requests that must keep an
    idempotency record in the same transaction do not come here.

    After the commit, the batch goes to this process's dispatcher (`dispatch_now`) instead of
    the intents stream, in the background: the stream hop (XADD, then XREADGROUP, XACK and
    the dispatcher's bookkeeping) was a sizeable share of the daemon's CPU per request. The
    promise is unchanged, because the row is what is durable, not the intent: if this
    process dies before the rows are dispatched they stay `queued`, and any instance's
    sweeper re-enqueues them after `NOTIFYD_REQUEUE_AFTER`. At most `max_in_process`
    batches are dispatched this way at once; past that (the dispatcher falling behind), or
    when a dispatch fails, the intents go on the stream as before and any instance takes
    them.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: Producer,
        keys: Keys,
        metrics: Metrics,
        *,
        max_batch: int = 64,
        writers: int = 2,
        dispatch_now: DispatchNow | None = None,
        max_in_process: int = 4,
        commit_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._keys = keys
        self._metrics = metrics
        self._dispatch_now = dispatch_now
        self._max_in_process = max_in_process
        self._in_process: set[asyncio.Task[None]] = set()
        self._closed = False  # after `close`: straight to the stream, nothing left behind
        self._writes: GroupCommit[tuple[store.NewNotification, AuditEntry], bool] = GroupCommit(
            self._write, max_batch=max_batch, max_concurrent=writers, timeout=commit_timeout
        )

    async def put(self, row: store.NewNotification, entry: AuditEntry) -> bool:
        """Stores and hands on; False when only the enqueue failed (the sweeper will).

        `CommitTimeout` past `commit_timeout`: the caller answers 503. A row whose batch
        was being written then may still commit, and is then delivered like any other
        (dispatched here, or by the sweeper): not accepted from the caller's view, but never
        stranded."""
        return await self._writes.submit((row, entry))

    async def _write(
        self, items: Sequence[tuple[store.NewNotification, AuditEntry]]
    ) -> list[bool | BaseException]:
        rows = [row for row, _ in items]
        async with self._pool.acquire() as conn:
            await store.insert_many_audited(conn, rows, [entry for _, entry in items])
        if self._dispatch_now is not None:
            if self._closed:
                self._metrics.dispatch_fallbacks.labels("closing").inc(len(rows))
            elif len(self._in_process) >= self._max_in_process:
                self._metrics.dispatch_fallbacks.labels("busy").inc(len(rows))
            else:
                count_accepted(self._metrics, rows)
                task = asyncio.create_task(self._dispatch(rows), name="dispatch-in-process")
                self._in_process.add(task)
                task.add_done_callback(self._in_process.discard)
                return [True] * len(rows)
        enqueued = await announce(self._producer, self._keys, rows, self._metrics)
        return [enqueued] * len(rows)

    async def _dispatch(self, rows: list[store.NewNotification]) -> None:
        assert self._dispatch_now is not None
        try:
            await self._dispatch_now([(row.tenant_id, row.id) for row in rows])
        except Exception as exc:
            log.warning(
                "in-process dispatch failed; the intents go on the stream",
                extra={"count": len(rows), "error": repr(exc)},
            )
            self._metrics.dispatch_fallbacks.labels("failed").inc(len(rows))
            await announce(self._producer, self._keys, rows, self._metrics, counted=True)

    async def close(self, grace: float) -> None:
        """Waits (up to `grace` seconds) for the batches being dispatched here; what is cut
        short stays `queued` (or `dispatched`) for the sweeper. A commit that ends after this
        (a request cut off by the server's own shutdown timeout) puts its intents on the
        stream instead of starting a dispatch nobody waits for."""
        self._closed = True
        if not self._in_process:
            return
        _, pending = await asyncio.wait(set(self._in_process), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)


async def accept(
    pool: asyncpg.Pool,
    producer: Producer,
    keys: Keys,
    settings: Settings,
    *,
    tenant_id: str,
    actor: Actor,
    orders: Sequence[Order],
    send: Reader[NotificationSend] | None = None,
    tenant: TenantSettings | None = None,
    metrics: Metrics | None = None,
) -> Accepted:
    """Check, render and store `orders` for `tenant_id` in one transaction (all or none),
    then enqueue them; returns their ids in order.

    `Refused` (nothing stored) names each field at fault; with several orders the field is
    prefixed by the order's index (`1.recipient`). `tenant` defaults to the stored settings,
    read without opening any secret. Database errors propagate (nothing is stored); a Redis
    failure after the commit does not (see `Accepted.enqueued`).
    """
    rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)
    send = send or Schemas.build(settings).send
    found = [
        FieldError(name, problem)
        for name, value in (("tenant_id", tenant_id), ("actor", actor.user_id))
        if (problem := rule.problem(value)) is not None
    ]
    for index, order in enumerate(orders):
        prefix = f"{index}." if len(orders) > 1 else ""
        found += [FieldError(prefix + p.field, p.message) for p in problems(order, send)]
    if found:
        raise Refused(found)
    if tenant is None:
        tenant = (await load_redacted(pool, tenant_id)).settings
    prepared: list[Prepared] = []
    for index, order in enumerate(orders):
        try:
            prepared.append(await prepare(pool, settings, tenant, tenant_id, order))
        except Refused as exc:
            if len(orders) == 1:
                raise
            numbered = [FieldError(f"{index}.{p.field}", p.message) for p in exc.problems]
            raise Refused(numbered) from None
    rows = [
        p.row(tenant_id=tenant_id, created_by=actor.user_id, request_id=actor.request_id)
        for p in prepared
    ]
    async with pool.acquire() as conn, conn.transaction():
        for row in rows:
            await record(conn, row, actor.audit(tenant_id, SEND_ACTION, audit_details(row)))
    enqueued = await announce(producer, keys, rows, metrics)
    return Accepted([row.id for row in rows], enqueued)


async def restart_failed(
    conn: Conn, tenant_id: str, notification_id: uuid.UUID, entry: AuditEntry
) -> str | None:
    """Start a failed (or undelivered) delivery over with fresh attempts, audited; call inside
    a transaction. Returns its channel (the caller enqueues `delivery_ref` on that channel's
    stream after the commit), or None when it was not failed (nothing written)."""
    channel = await deliveries.requeue_failed(conn, tenant_id, notification_id)
    if channel is not None:
        await audit.record(conn, entry)
    return channel


def delivery_ref(tenant_id: str, notification_id: uuid.UUID) -> dict[str, str]:
    """The delivery stream entry a restarted delivery is put back with."""
    return DeliveryRef(tenant_id, str(notification_id)).to_fields()
