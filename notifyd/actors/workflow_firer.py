"""Workflow firer: a due step becomes a notification (or a recorded skip), exactly once.

The timer moves a due step from the wheel to `notifyd:workflow-steps` (atomically, so with
several instances it arrives once); even if an entry is replayed or taken over from a dead
peer, the step's row lock decides: the firer locks the row, finds it still `pending`, and
writes the notification (through `accept`, the one acceptance path: rendered, opt-outs
known) and the step's outcome in the same transaction. A cancel waits for that lock, so
one of the two sees what the other did, never both act.

What the step's `unless` asks is read at its time: `online` from the live socket seats
(every instance's, in Redis), `read` from PostgreSQL under the lock (an in-app
notification an earlier step of the run made, read by now).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis

from notifyd.accept.orders import Order, Refused
from notifyd.accept.outbox import announce
from notifyd.accept.prepare import prepare
from notifyd.accept.rows import SEND_ACTION, audit_details, new_row
from notifyd.keys import FIRE_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.preferences import suppression_reason
from notifyd.settings import Settings
from notifyd.store import audit
from notifyd.store import preferences as stored_preferences
from notifyd.store import workflows as store
from notifyd.store.audit import AuditEntry
from notifyd.store.notifications import NewNotification, insert_many_audited
from notifyd.store.tenants import TenantSettings
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.workflows import address, quiet_until, wheel_item

log = logging.getLogger("notifyd.actors.workflows")

FIRE_BATCH = 50
FIRE_CONCURRENCY = 16
REASON_MAX_LENGTH = 200


def _parse(entry: Entry) -> tuple[str, uuid.UUID, int, datetime]:
    """(tenant, run id, step position, the due time this entry was moved for; 1 ms of float
    rounding allowed, now when the entry has none)."""
    try:
        tenant_id = entry.fields[b"tenant_id"].decode()
        run_id = uuid.UUID(entry.fields[b"run_id"].decode())
        position = int(entry.fields[b"position"])
        due_ms = entry.fields.get(b"due_ms")
        due = (
            datetime.fromtimestamp(float(due_ms) / 1000, UTC) + timedelta(milliseconds=1)
            if due_ms is not None
            else datetime.now(UTC)
        )
    except (KeyError, UnicodeDecodeError, ValueError):
        raise Poison("malformed workflow step entry") from None
    return tenant_id, run_id, position, due


async def _until(when: datetime) -> None:
    """Sleeps until `when` by the wall clock (the clock `due_at` is written in)."""
    wait = (when - datetime.now(UTC)).total_seconds()
    if wait > 0:
        await asyncio.sleep(wait)


class WorkflowFirer:
    name = "workflows"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        metrics: Metrics,
        producer: Producer,
        consumer_name: str,
        tenant_settings: Callable[[str], Awaitable[TenantSettings]],
        schedule: Schedule,
    ) -> None:
        """`tenant_settings`: the tenant's settings (cached; only region and locale are
        read, to render and to read phone numbers)."""
        self._pool = pool
        self._tenant_settings = tenant_settings
        self._schedule = schedule
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._producer = producer
        self.consumer = StreamConsumer(
            redis,
            stream=keys.workflow_steps,
            group=FIRE_GROUP,
            consumer=consumer_name,
            handle=self.handle,
            dead_letters=keys.dead_letters,
            producer=producer,
            concurrency=FIRE_CONCURRENCY,
            batch=FIRE_BATCH,
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts + 5,
            metrics=metrics,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, entry: Entry) -> None:
        tenant_id, run_id, position, due = _parse(entry)
        step = await store.peek_step(self._pool, tenant_id, run_id, position)
        if step is None or step["status"] != "pending" or step["due_at"] > due:
            return  # cancelled, already done, or not due yet: a stale entry
        await _until(step["due_at"])
        await self.fire(step)

    async def online(self, tenant_id: str, user_id: str) -> bool:
        """Whether the user has a socket open on any instance now (an unexpired seat)."""
        now_ms = time.time() * 1000
        key = self._keys.user_sockets(tenant_id, user_id)
        return int(await self._redis.zcount(key, f"({now_ms}", "+inf")) > 0

    async def _decide(
        self, step: asyncpg.Record, context: dict[str, Any]
    ) -> tuple[str, str | None, NewNotification | None]:
        """(status, reason, the notification to make) from what can be read before the lock."""
        tenant_id, user_id = step["tenant_id"], step["recipient"]
        if "online" in step["unless"] and await self.online(tenant_id, user_id):
            return "skipped", "online", None
        to = address(step["channel"], user_id, step["email"], step["phone"])
        if to is None:
            return "skipped", "no_address", None
        prefs = stored_preferences.from_columns(step["pref_channels"], step["pref_categories"])
        if suppression_reason(
            prefs, channel=step["channel"], category=step["category"], critical=step["critical"]
        ):
            return "skipped", "opted_out", None
        order = Order(
            channel=step["channel"],
            recipient=to,
            template_key=step["template_key"],
            context=context,
            user_id=None if step["channel"] == "in_app" else user_id,
            category=step["category"],
            critical=step["critical"],
            locale=step["locale"],
        )
        tenant = await self._tenant_settings(tenant_id)
        try:
            prepared = await prepare(self._pool, self._settings, tenant, tenant_id, order)
        except Refused as exc:
            return "failed", f"render: {exc}"[:REASON_MAX_LENGTH], None
        row = new_row(prepared, tenant_id=tenant_id, created_by=step["created_by"])
        return "sent", None, row

    async def fire(self, step: asyncpg.Record) -> str | None:
        """The step's outcome, written under its row lock; None when it was no longer
        pending (cancelled, or fired by a peer) and nothing was written. A step inside its
        recipient's quiet hours (of a trigger that is not critical) is `deferred`: due at
        their end, back on the wheel."""
        tenant_id, run_id, position = step["tenant_id"], step["run_id"], step["position"]
        if not step["critical"]:
            until = quiet_until(datetime.now(UTC), step["quiet_hours"], step["timezone"])
            if until is not None:
                return await self._defer(step, until)
        context = dict(step["data"] or {})
        if step["digest_key"] is not None:
            # closed first: every trigger merged into the run is among the items read now
            items = await store.close_digest(self._pool, tenant_id, run_id)
            context |= {"items": items, "count": len(items)}
        status, reason, row = await self._decide(step, context)
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await store.lock_step(conn, tenant_id, run_id, position)
            if locked is None or locked["status"] != "pending":
                return None
            if "read" in step["unless"] and locked["read"]:
                status, reason, row = "skipped", "read", None
            if row is not None:
                sent = AuditEntry(
                    tenant_id=tenant_id,
                    user_id=None,
                    action=SEND_ACTION,
                    ip_address=None,
                    request_id=None,
                    details={"via": "workflow", "run_id": str(run_id), **audit_details(row)},
                )
                await insert_many_audited(conn, [row], [sent])
            lateness = await store.finish_step(
                conn,
                tenant_id,
                run_id,
                position,
                status=status,
                reason=reason,
                notification_ids=[row.id] if row is not None else [],
            )
            await audit.record(
                conn,
                AuditEntry(
                    tenant_id=tenant_id,
                    user_id=None,
                    action=f"workflow.step.{status}",
                    ip_address=None,
                    request_id=None,
                    details={
                        "run_id": str(run_id),
                        "position": position,
                        "reason": reason,
                        "lateness_ms": lateness,
                    },
                ),
            )
        if row is not None:
            await announce(self._producer, self._keys, [row], self._metrics)
        self._metrics.workflow_steps.labels(status).inc()
        self._metrics.workflow_step_lateness.observe(lateness or 0)
        log.info(
            "workflow step %s",
            status,
            extra={"run_id": str(run_id), "position": position, "reason": reason},
        )
        return status

    async def _defer(self, step: asyncpg.Record, until: datetime) -> str | None:
        """Quiet hours: the step's due time moves to their end (under the row lock, so a
        cancel serialises with it), audited, then its wheel member is re-scored."""
        tenant_id, run_id, position = step["tenant_id"], step["run_id"], step["position"]
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await store.lock_step(conn, tenant_id, run_id, position)
            if locked is None or locked["status"] != "pending":
                return None
            await store.defer_step(conn, tenant_id, run_id, position, until, "quiet_hours")
            await audit.record(
                conn,
                AuditEntry(
                    tenant_id=tenant_id,
                    user_id=None,
                    action="workflow.step.deferred",
                    ip_address=None,
                    request_id=None,
                    details={
                        "run_id": str(run_id),
                        "position": position,
                        "reason": "quiet_hours",
                        "until": until.isoformat(),
                    },
                ),
            )
        # the row holds the new time: if Redis fails here, the sweeper's overdue check puts
        # the step back on the wheel from PostgreSQL (late), as after any lost member
        await self._schedule.add(wheel_item(self._keys, tenant_id, run_id, position), until)
        self._metrics.workflow_steps.labels("deferred").inc()
        return "deferred"
