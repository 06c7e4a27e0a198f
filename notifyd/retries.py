"""A delivery's entries on the timer wheel: the one the sender adds, the sweeper rebuilds.

Both actors must build the very same member (same stream, same fields, same key) for the
wheel's NX rebuild to find what is already there, so the shape is written once, here, below
both of them (no actor imports another: see docs/architecture.md, "Layers").
"""

from __future__ import annotations

from notifyd.keys import Keys
from notifyd.payloads import DeliveryRef
from notifyd.streams.schedule import Scheduled


def retry_item(keys: Keys, channel: str, ref: DeliveryRef, attempt: int) -> Scheduled:
    """The wheel entry of one retry; the sweeper rebuilds the same one from the row."""
    return Scheduled(keys.deliver(channel), ref.to_fields(), key=f"retry:{attempt}")


def waiting_item(keys: Keys, channel: str, ref: DeliveryRef) -> Scheduled:
    """The wheel entry of a delivery set aside while its tenant is at its cap. Redis only:
    its row is untouched, so if Redis loses it the sweeper re-enqueues the row as it does
    any row left `dispatched` (after NOTIFYD_REQUEUE_AFTER)."""
    return Scheduled(keys.deliver(channel), ref.to_fields(), key="waiting")
