"""Operator alerts as the code that raises them sees them: one call that never blocks.

The actor that emails them (`actors.alerts.Alerts`, rate-limited per kind across instances)
meets this port; the dispatcher, the senders and the event sources hold it, filled by the
composition root (`pipeline.py`), so no actor imports another (docs/architecture.md,
"Layers").
"""

from __future__ import annotations

from typing import Protocol


class Alerting(Protocol):
    def raise_alert(self, kind: str, subject: str, body: str) -> None:
        """Queue an alert for the operators; dropped (and logged) when alerts are off or
        the queue is full. Never blocks, never raises."""
        ...
