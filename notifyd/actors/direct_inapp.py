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

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from notifyd.actors.sender import delivery_of
from notifyd.metrics import Metrics
from notifyd.providers.base import Sent
from notifyd.providers.inapp import InAppProvider
from notifyd.store import deliveries

log = logging.getLogger("notifyd.actors.direct_inapp")


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Ready:
    """A queued row the dispatcher cleared for delivery, with its final content (rendered
    now when acceptance did not)."""

    row: asyncpg.Record
    subject: str | None
    body: str
    html: str | None


class DirectInApp:
    def __init__(self, pool: asyncpg.Pool, provider: InAppProvider, metrics: Metrics) -> None:
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
