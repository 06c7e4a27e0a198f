"""Workflow firer: due steps become notifications (or recorded skips), each exactly once.

The timer moves a step from the wheel to `notifyd:workflow-steps` up to
NOTIFYD_REMINDER_LOOKAHEAD before its time (atomically, so with several instances it arrives
once), as it does reminders. What one stream read returns is handled as a batch: one query
reads the steps, each is planned ahead of its time (address, opt-outs, the template
rendered through `accept`, the one acceptance path), then the steps are fired in waves,
each wave once its steps' time has come by the wall clock: what is left of lateness is the
wake-up and one transaction per wave.

Even if an entry is replayed or taken over from a dead peer, the step's row lock decides: a
wave locks its rows in one statement (in (run, position) order, as a cancel does), keeps
only those still `pending`, and writes the notifications and every outcome with their
audit rows in the same transaction. The waves of all batches due at one moment share that
transaction (a group commit, `store.batch.GroupCommit`): at a thousand steps a second the
batches' waves were many small transactions, and their commits, not the work, made steps
late. A cancel waits for those locks, so one of the two sees what the other did, never
both act.

What a step's `unless` asks is read at its time, in its wave: `online` from the live
socket seats (every instance's, in Redis; one pipelined read per wave), `read` from
PostgreSQL under the lock (an in-app notification an earlier step of the run made, read by
now). Quiet hours are decided at the step's time too: a wave's steps inside their
recipients' quiet hours move to the hours' end together, in one transaction of their own. A
digest's step closes its run at its time, so it goes on its own (`fire`), in its wave.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from notifyd.accept.orders import Order, Refused
from notifyd.accept.outbox import announce
from notifyd.accept.prepare import prepare
from notifyd.accept.rows import SEND_ACTION, audit_details, new_row
from notifyd.compose import Composer, render_limits
from notifyd.ids import uuid7
from notifyd.keys import FIRE_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.preferences import suppression_reason
from notifyd.settings import Settings
from notifyd.store import notifications as stored_notifications
from notifyd.store import preferences as stored_preferences
from notifyd.store import workflows as store
from notifyd.store.audit import AuditEntry
from notifyd.store.batch import GroupCommit
from notifyd.store.notifications import NewNotification
from notifyd.store.tenants import TenantSettings, locale_for
from notifyd.store.workflows import StepKey
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.due import due_of, in_waves, latest_due
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.workflows import address, quiet_until, wheel_item

log = logging.getLogger("notifyd.actors.workflows")

FIRE_BATCH = 100  # steps read per stream read: one query reads them, one plan each
# Batches waiting for their time hold their slot (their entries are acknowledged once
# fired), so there must be enough for a lookahead's worth of steps plus the one being read
# (as the reminder firer's).
FIRE_BATCHES_IN_FLIGHT = 64  # live triggers make small batches: each holds a slot a while
# a wave whose transaction was chosen as a deadlock's victim is tried again (the locks are
# taken in one order everywhere, so this is a safety net, not a path)
FIRE_TRIES = 3
# waves of concurrent batches committed together: at most this many per transaction, and
# this many transactions at once (each on its own connection)
WAVES_PER_COMMIT = 32
COMMITS_IN_FLIGHT = 2
REASON_MAX_LENGTH = 200


@dataclass(frozen=True, slots=True)
class Plan:
    """A step read for firing and what it becomes unless its time says otherwise
    (`unless`, quiet hours): `row` is the notification it makes when `status` is sent."""

    step: asyncpg.Record
    status: str
    reason: str | None
    row: NewNotification | None

    @property
    def key(self) -> StepKey:
        return _key(self.step)


@dataclass(frozen=True, slots=True)
class Fired:
    """A step's outcome as committed, and the notification it made."""

    record: asyncpg.Record  # tenant_id, run_id, position, status, reason, lateness_ms
    plan: Plan
    row: NewNotification | None


def _key(step: asyncpg.Record) -> StepKey:
    return (step["tenant_id"], step["run_id"], step["position"])


def _parse(entry: Entry) -> tuple[StepKey, datetime]:
    """((tenant, run id, step position), the due time this entry was moved for)."""
    try:
        tenant_id = entry.fields[b"tenant_id"].decode()
        run_id = uuid.UUID(entry.fields[b"run_id"].decode())
        position = int(entry.fields[b"position"])
        return (tenant_id, run_id, position), due_of(entry)
    except (KeyError, UnicodeDecodeError, ValueError):
        raise Poison("malformed workflow step entry") from None


def _quiet_until(step: asyncpg.Record, now: datetime, zone: str | None) -> datetime | None:
    """When a step due `now` may go, if its recipient's quiet hours (read in `zone`) hold it
    back (None: it may go now); a critical trigger ignores them."""
    if step["critical"]:
        return None
    return quiet_until(now, step["quiet_hours"], zone)


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
        """`tenant_settings`: the tenant's settings (cached, the configuration source's over
        the stored ones; region, locale, time zone and templates are read, to render and to
        read phone numbers)."""
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
            handle_batch=self.handle_batch,
            dead_letters=keys.dead_letters,
            producer=producer,
            concurrency=FIRE_BATCHES_IN_FLIGHT,
            batch=FIRE_BATCH,
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts + 5,
            metrics=metrics,
        )
        # the waves of every batch due at one moment share a transaction (and its commit)
        self._waves: GroupCommit[tuple[Plan, ...], list[Fired]] = GroupCommit(
            self._flush, max_batch=WAVES_PER_COMMIT, max_concurrent=COMMITS_IN_FLIGHT
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle_batch(self, entries: list[Entry]) -> None:
        """Everything one read returned: one query reads the steps, each is planned ahead,
        then each wave of those whose time has come is fired in one transaction."""
        wanted = await latest_due(entries, _parse, self.consumer.dead_letter)
        if not wanted:
            return
        steps = [
            step
            for step in await store.peek_steps(self._pool, list(wanted))
            if step["status"] == "pending" and step["due_at"] <= wanted[_key(step)]
        ]  # the rest are stale: cancelled, already done, or deferred to later
        steps.sort(key=lambda step: step["due_at"])
        composer = await self._composer({step["tenant_id"] for step in steps})
        plans = [await self._plan(step, composer) for step in steps]
        await in_waves(plans, lambda plan: plan.step["due_at"], self._fire_wave)

    async def _composer(self, tenants: set[str]) -> Composer:
        """One for a batch: each distinct template resolved once, in the tenants' default
        locales, with the tenants' settings as the cache has them (the tenant configuration
        source's templates over the stored ones)."""
        known = {tenant_id: await self._tenant_settings(tenant_id) for tenant_id in tenants}
        return Composer(
            self._pool,
            self._settings.default_locale,
            limits=render_limits(self._settings),
            default_locales={t: locale_for(s, self._settings) for t, s in known.items()},
            known=known,
        )

    async def _plan(self, step: asyncpg.Record, composer: Composer) -> Plan:
        """What the step becomes, decided ahead of its time; a digest's step is decided at
        its time instead (`fire`: it closes its run, then renders the items), so its plan
        says nothing yet."""
        if step["digest_key"] is not None:
            return Plan(step, "pending", None, None)
        status, reason, row = await self._prepare(step, dict(step["data"] or {}), composer)
        return Plan(step, status, reason, row)

    async def _fire_wave(self, plans: Sequence[Plan]) -> None:
        """Steps whose time has come: quiet hours, then `online`, then one transaction; the
        steps that go first, then those deferred (quiet hours) and those of digests (each
        on its own: it closes its run), so neither kind makes the others late."""
        now = datetime.now(UTC)
        going: list[Plan] = []
        deferred: list[tuple[asyncpg.Record, datetime]] = []
        digests: list[asyncpg.Record] = []
        for plan in plans:
            step = plan.step
            if step["digest_key"] is not None:
                digests.append(step)
                continue
            until = _quiet_until(step, now, await self._zone(step))
            if until is not None:
                deferred.append((step, until))
                continue
            going.append(plan)
        online = await self._online([p.step for p in going if "online" in p.step["unless"]])
        decided = [
            Plan(plan.step, "skipped", "online", None) if plan.key in online else plan
            for plan in going
        ]
        await self._commit(decided)
        await self._defer(deferred)
        for step in digests:
            await self.fire(step)

    async def fire(self, step: asyncpg.Record) -> str | None:
        """One step on its own, at its time (a digest's, or a caller's); its outcome, or None
        when it was no longer pending (cancelled, or fired by a peer) and nothing was
        written. A step inside its recipient's quiet hours (of a trigger that is not
        critical) is `deferred`: due at their end, back on the wheel."""
        until = _quiet_until(step, datetime.now(UTC), await self._zone(step))
        if until is not None:
            return "deferred" if await self._defer([(step, until)]) else None
        context = dict(step["data"] or {})
        if step["digest_key"] is not None:
            # closed first: every trigger merged into the run is among the items read now
            items = await store.close_digest(self._pool, step["tenant_id"], step["run_id"])
            context |= {"items": items, "count": len(items)}
        status: str
        reason: str | None
        row: NewNotification | None
        if "online" in step["unless"] and await self._online([step]):
            status, reason, row = "skipped", "online", None
        else:
            status, reason, row = await self._prepare(step, context)
        fired = await self._commit([Plan(step, status, reason, row)])
        return fired[0].record["status"] if fired else None

    async def _zone(self, step: asyncpg.Record) -> str | None:
        """The zone the step's quiet hours are read in: the recipient's, else the tenant's
        default (`default_timezone` of its settings), else None (UTC)."""
        own: str | None = step["timezone"]
        if own or not step["quiet_hours"]:
            return own  # no settings read for a step without quiet hours
        return (await self._tenant_settings(step["tenant_id"])).default_timezone

    async def _online(self, steps: Sequence[asyncpg.Record]) -> set[StepKey]:
        """The steps whose recipient has a socket open on any instance now (an unexpired
        seat): one pipelined read for them all."""
        if not steps:
            return set()
        now_ms = time.time() * 1000
        async with self._redis.pipeline(transaction=False) as pipe:
            for step in steps:
                pipe.zcount(
                    self._keys.user_sockets(step["tenant_id"], step["recipient"]),
                    f"({now_ms}",
                    "+inf",
                )
            counts: list[Any] = await pipe.execute()
        return {_key(step) for step, count in zip(steps, counts, strict=True) if int(count) > 0}

    async def _prepare(
        self, step: asyncpg.Record, context: dict[str, Any], composer: Composer | None = None
    ) -> tuple[str, str | None, NewNotification | None]:
        """(status, reason, the notification to make) from what can be read before the
        step's time: its address, the recipient's opt-outs, the rendered template."""
        tenant_id, user_id = step["tenant_id"], step["recipient"]
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
            prepared = await prepare(
                self._pool, self._settings, tenant, tenant_id, order, composer=composer
            )
        except Refused as exc:
            return "failed", f"render: {exc}"[:REASON_MAX_LENGTH], None
        row = new_row(prepared, tenant_id=tenant_id, created_by=step["created_by"])
        return "sent", None, row

    async def _commit(self, plans: Sequence[Plan]) -> list[Fired]:
        """The plans' outcomes, committed under their rows' locks (with the waves of other
        batches due at the same moment: one transaction for them all), then their intents,
        metrics and log lines. Returns the steps finished (one no longer pending is absent:
        nothing was written for it)."""
        if not plans:
            return []
        return await self._waves.submit(tuple(plans))

    async def _flush(self, waves: Sequence[tuple[Plan, ...]]) -> list[list[Fired]]:
        """Waves submitted together: one transaction, then one XADD of every intent."""
        plans = [plan for wave in waves for plan in wave]
        for attempt in range(1, FIRE_TRIES + 1):
            try:
                fired = await self._write(plans)
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == FIRE_TRIES:
                    raise  # the batch stays pending: taken over after NOTIFYD_CLAIM_IDLE
                log.warning("workflow wave chosen as a deadlock victim; trying again")
        made = [f.row for f in fired if f.row is not None]
        if made:
            await announce(self._producer, self._keys, made, self._metrics)
        for f in fired:
            status, lateness = f.record["status"], f.record["lateness_ms"]
            self._metrics.workflow_steps.labels(status).inc()
            self._metrics.workflow_step_lateness.observe(lateness or 0)
            log.info(
                "workflow step %s",
                status,
                extra={
                    "run_id": str(f.record["run_id"]),
                    "position": f.record["position"],
                    "reason": f.record["reason"],
                    "lateness_ms": lateness,
                },
            )
        by_plan = {id(f.plan): f for f in fired}
        return [[by_plan[id(p)] for p in wave if id(p) in by_plan] for wave in waves]

    async def _write(self, plans: Sequence[Plan]) -> list[Fired]:
        """One transaction: the rows locked, each still pending written once (two plans of
        one step, from a replayed entry in another batch: the first), nothing for the rest."""
        async with self._pool.acquire() as conn, conn.transaction():
            locked = await store.lock_steps(conn, list({plan.key: None for plan in plans}))
            outcomes: list[store.Outcome] = []
            taken: dict[StepKey, tuple[Plan, NewNotification | None]] = {}
            for plan in plans:
                found = locked.get(plan.key)
                if found is None or found["status"] != "pending":
                    continue  # cancelled, or fired by a peer: nothing is written for it
                if plan.key in taken:
                    continue  # the same step twice in this transaction: written once
                status, reason, row = plan.status, plan.reason, plan.row
                if "read" in plan.step["unless"] and found["read"]:
                    status, reason, row = "skipped", "read", None
                taken[plan.key] = (plan, row)
                outcomes.append(
                    store.Outcome(
                        plan.key, status, reason, None if row is None else row.id, uuid7()
                    )
                )
            rows = {key: row for key, (_, row) in taken.items() if row is not None}
            if rows:
                await stored_notifications.insert_many_audited(
                    conn,
                    list(rows.values()),
                    [
                        AuditEntry(
                            tenant_id=row.tenant_id,
                            user_id=None,
                            action=SEND_ACTION,
                            ip_address=None,
                            request_id=None,
                            details={
                                "via": "workflow",
                                "run_id": str(key[1]),
                                **audit_details(row),
                            },
                        )
                        for key, row in rows.items()
                    ],
                )
            finished = await store.finish_steps(conn, outcomes) if outcomes else []
        return [Fired(record, *taken[_key(record)]) for record in finished]

    async def _defer(self, deferred: Sequence[tuple[asyncpg.Record, datetime]]) -> int:
        """Quiet hours: each step's due time moves to their end, audited, in one transaction
        under the rows' locks (taken in (run, position) order, as a cancel takes them); then
        their wheel members are re-scored in one command. How many were deferred (a step no
        longer pending is left as it is)."""
        if not deferred:
            return 0
        keys = [_key(step) for step, _ in deferred]
        async with self._pool.acquire() as conn, conn.transaction():
            await store.lock_steps(conn, keys)
            moved = await store.defer_steps(
                conn, [(key, until) for key, (_, until) in zip(keys, deferred, strict=True)]
            )
        # the rows hold the new times: if Redis fails here, the sweeper's overdue check puts
        # the steps back on the wheel from PostgreSQL (late), as after any lost member
        await self._schedule.add_many(
            [
                (
                    wheel_item(self._keys, row["tenant_id"], row["run_id"], row["position"]),
                    row["due_at"],
                )
                for row in moved
            ]
        )
        self._metrics.workflow_steps.labels("deferred").inc(len(moved))
        return len(moved)
