"""Dispatcher: turns a stored notification into a delivery on its channel's stream.

For each intent it renders what was not rendered at accept time (notifications made by other
producers: reminders, ingested events), applies the recipient's preferences (critical ones
bypass opt-outs), marks the row `dispatched`, and adds the delivery to
`notifyd:deliver:{channel}`. In-app rows are delivered here directly (`DirectInApp`, a part
of the dispatcher, not an actor): their "send" is one Redis publish, not worth a second
stream hop. A replayed intent for an already
dispatched row re-adds the delivery: senders claim rows in PostgreSQL, so a duplicate entry
is harmless, a missing one would not be.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from notifyd.alerts import Alerting
from notifyd.compose import Composer, render_limits
from notifyd.keys import DISPATCH_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.payloads import DeliveryRef, NotificationIntent, PayloadError
from notifyd.preferences import suppression_reason
from notifyd.providers.base import Sent, delivery_of
from notifyd.providers.inapp import InAppProvider
from notifyd.providers.render import TemplateError
from notifyd.settings import Settings
from notifyd.store import deliveries
from notifyd.store import preferences as preference_store
from notifyd.store.tenants import TenantSettings
from notifyd.streams.consumer import Entry, StreamConsumer, Timing
from notifyd.streams.producer import Producer
from notifyd.suppressions import listed_reason

log = logging.getLogger("notifyd.actors.dispatcher")


BATCH = 64  # intents handled per stream read
BATCHES_IN_FLIGHT = 2  # reads in flight: one waits on PostgreSQL while the next is read


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Ready:
    """A queued row the dispatcher cleared for delivery, with its final content (rendered
    now when acceptance did not)."""

    row: asyncpg.Record
    subject: str | None
    body: str
    html: str | None


class DirectInApp:
    """In-app delivery done by the dispatcher itself, without a second stream hop.

    An in-app "send" is one Redis script call that records the live event on the user's feed; the
    row is already in the notification center. Sending it the way email goes (mark `dispatched`,
    XADD to `notifyd:deliver:in_app`, a sender reads it, claims the row, publishes, marks it
    `sent`) costs three row versions (each rewriting every index of `notifications`) and four
    Redis round trips per batch for a single publish. Under load that was most of PostgreSQL's
    work per notification. Here the dispatcher publishes the batch's events and moves the rows
    from `queued` to `sent` in one UPDATE.

    The promises are the sender's. The publish comes before the UPDATE, so a crash between the
    two leaves the row `queued` and its intent pending: it is published again (at least once; the
    event carries the notification id, which clients dedupe on). Rows whose publish failed stay
    `queued` and the dispatcher routes them the ordinary way, where the in-app sender retries
    with backoff. Two instances racing on one intent may both publish; one UPDATE wins.
    """

    def __init__(self, pool: asyncpg.Pool, provider: InAppProvider, metrics: Metrics) -> None:
        """`pool`: the keyed pool (`store.pool.KEYED_SETTINGS`): its one statement finds its
        rows by key."""
        if not provider.batched:
            raise ValueError("direct in-app delivery needs a provider that publishes in batches")
        self._pool = pool
        self._provider = provider
        self._metrics = metrics

    async def deliver(self, rows: Sequence[Ready]) -> set[uuid.UUID]:
        """Publish the live events of queued in-app `rows` (preferences applied) and mark
        them sent with their content. Returns the ids handled: sent now, or by a peer
        first. The others failed to publish and are still `queued`."""
        batch = [
            # the row is still `queued`: this send is its next attempt
            delivery_of(
                r.row, subject=r.subject, body=r.body, html=r.html, attempt=r.row["attempts"] + 1
            )
            for r in rows
        ]
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await self._provider.send_many(batch)
        self._metrics.provider_latency.labels("in_app").observe(loop.time() - started)
        published = [
            deliveries.Published(
                ready.row["tenant_id"],
                ready.row["id"],
                ready.subject,
                ready.body,
                ready.html,
                result.provider_message_id or "",
            )
            for ready, result in zip(rows, results, strict=True)
            if isinstance(result, Sent)
        ]
        failed = [r for r in results if not isinstance(r, Sent)]
        if failed:
            log.warning(
                "live events not published; the in-app sender takes them over",
                extra={"count": len(failed), "error": str(failed[0])},
            )
        if not published:
            return set()
        recorded = await deliveries.send_queued_many(self._pool, published)
        self._metrics.deliveries.labels("in_app", "sent").inc(len(recorded))
        return {p.id for p in published}


class Dispatcher:
    name = "dispatcher"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        keyed_pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        consumer_name: str,
        alerts: Alerting,
        producer: Producer,
        metrics: Metrics,
        direct_in_app: DirectInApp | None = None,
        tenant_settings: Callable[[str], Awaitable[TenantSettings]] | None = None,
    ) -> None:
        """With `direct_in_app`, in-app rows are delivered here (rendered first if need be), not
        through the in-app sender's stream (see `DirectInApp`). `tenant_settings`: a tenant's
        settings as rendering reads them (default locale, the source's templates); by default
        the stored ones."""
        self._tenant_settings = tenant_settings
        self._alerts = alerts
        self._direct_in_app = direct_in_app
        self._producer = producer
        self._pool = pool
        self._keyed_pool = keyed_pool  # the batches' statements by key (store.pool)
        self._keys = keys
        self._settings = settings
        self.consumer = StreamConsumer(
            redis,
            stream=keys.intents,
            group=DISPATCH_GROUP,
            consumer=consumer_name,
            dead_letters=keys.dead_letters,
            producer=producer,
            on_dead=self._on_dead,
            handle_batch=self.handle_batch,
            concurrency=BATCHES_IN_FLIGHT,
            batch=BATCH,
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts,
            metrics=metrics,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle_batch(self, entries: list[Entry]) -> None:
        """A whole stream read at once: one query loads the rows with their users'
        preferences (one more, their suppression list entries), one UPDATE dispatches them,
        one pipelined round trip enqueues them. Each entry gets the decisions it would get
        alone, at a fraction of the round trips."""
        wanted: list[tuple[Entry, str, uuid.UUID]] = []
        for entry in entries:
            try:
                intent = NotificationIntent.from_fields(entry.fields)
                wanted.append((entry, intent.tenant_id, intent.uuid))
            except PayloadError as exc:
                await self.consumer.dead_letter(entry, str(exc))
        if not wanted:
            return
        rows = await deliveries.load_many_for_dispatch(
            self._keyed_pool, [(tenant, nid) for _, tenant, nid in wanted]
        )
        found = {(r["tenant_id"], r["id"]): r for r in rows}
        queued: dict[uuid.UUID, asyncpg.Record] = {}
        ready: dict[uuid.UUID, asyncpg.Record] = {}
        for entry, tenant, nid in wanted:
            row = found.get((tenant, nid))
            if row is None:
                await self.consumer.dead_letter(
                    entry, f"no notification {nid} in tenant {tenant!r}"
                )
            elif row["status"] == "queued":
                queued[nid] = row
            elif row["status"] == "dispatched":
                ready[nid] = row  # enqueued before, maybe lost since: again (at least once)
        await self._dispatch(list(queued.values()), list(ready.values()))

    async def dispatch_now(self, ids: Sequence[tuple[str, uuid.UUID]]) -> None:
        """Dispatches rows this process has just committed, (tenant, id) each, without the
        intents stream (see `accept.outbox.Outbox`): the same decisions as `handle_batch`
        without the XADD, the XREADGROUP and the XACK. Raises when that could not be done; the
        caller then puts the intents on the stream."""
        rows = await deliveries.load_many_for_dispatch(self._keyed_pool, list(ids))
        await self._dispatch([row for row in rows if row["status"] == "queued"], [])

    async def _dispatch(self, queued: list[asyncpg.Record], ready: list[asyncpg.Record]) -> None:
        """Routes the `queued` rows, then puts them and the `ready` ones (dispatched before)
        on their channels' delivery streams in one round trip."""
        if queued:
            ready = ready + await self._route_many(queued)
        if ready:
            await self._producer.add_many(
                [
                    (
                        self._keys.deliver(row["channel"]),
                        DeliveryRef(row["tenant_id"], str(row["id"])).to_fields(),
                    )
                    for row in ready
                ]
            )

    async def _route_many(self, rows: list[asyncpg.Record]) -> list[asyncpg.Record]:
        """Render what was not rendered at acceptance, apply the tenant's suppression list
        (one query, for the email and SMS rows) and each user's preferences (read with the
        rows), deliver the in-app rows here and mark the others dispatched (one UPDATE);
        returns the rows now dispatched, for their channels' streams."""
        listed = await deliveries.listed_many(self._keyed_pool, rows)
        ready: list[Ready] = []
        composer = Composer(
            self._pool,
            self._settings.default_locale,
            limits=render_limits(self._settings),
            tenants=self._tenant_settings,
        )
        suppressed: list[tuple[str, uuid.UUID, str]] = []
        for row in rows:
            entry = listed.get(row["id"])
            reason = None if entry is None else listed_reason(*entry, critical=row["critical"])
            if reason is None and row["user_id"] is not None:
                reason = suppression_reason(
                    preference_store.from_columns(
                        row["preferred_channels"], row["preferred_categories"]
                    ),
                    channel=row["channel"],
                    category=row["category"],
                    critical=row["critical"],
                )
            if reason is not None:
                suppressed.append((row["tenant_id"], row["id"], reason))
                continue  # not rendered: it is not sent
            content = await self._content(composer, row)
            if content is None:
                continue  # the template failed: the row is `failed`, with the reason
            ready.append(Ready(row, *content))
        if suppressed:
            await deliveries.suppress_many(self._pool, suppressed)
        if self._direct_in_app is not None:
            in_app = [r for r in ready if r.row["channel"] == "in_app"]
            if in_app:
                done = await self._direct_in_app.deliver(in_app)
                # what could not be published goes the ordinary way, with the sender's retries
                ready = [r for r in ready if r.row["id"] not in done]
        if not ready:
            return []
        changed = await deliveries.dispatch_many(
            self._keyed_pool,
            [(r.row["tenant_id"], r.row["id"], r.subject, r.body, r.html) for r in ready],
        )
        return [r.row for r in ready if r.row["id"] in changed]

    async def _content(
        self, composer: Composer, row: asyncpg.Record
    ) -> tuple[str | None, str, str | None] | None:
        """Subject, text and HTML: as stored when rendered at acceptance (every REST send),
        else rendered now (reminders, ingested events). None when the template fails: the
        row is then marked failed."""
        if row["body"] is not None:
            return row["subject"], row["body"], row["html_body"]
        try:
            rendered = await composer.compose(
                tenant_id=row["tenant_id"],
                channel=row["channel"],
                template_key=row["template_key"],
                context=row["context"],
                subject=row["subject"],
                message=row["body"],
                locale=row["locale"],
            )
        except TemplateError as exc:
            await deliveries.fail_queued(self._pool, row["tenant_id"], row["id"], exc.reason)
            log.warning("notification failed to render", extra={"id": str(row["id"])})
            return None
        return rendered.subject, rendered.text, rendered.html

    async def _on_dead(self, entry: Entry, reason: str) -> None:
        """Only the stream entry is given up on: a row it names stays `queued` and the sweeper
        re-enqueues it, so an outage or a crashing handler never fails a notification."""
        self._alerts.raise_alert(
            "dead-letter:intents",
            "notifyd: intents are being dead-lettered",
            f"An entry of {self.consumer.stream} was dead-lettered ({reason}). See the "
            "dead-letter stream and the log.",
        )
