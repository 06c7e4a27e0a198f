"""Whether a recipient's preferences let a notification through: pure logic, no I/O.

A user may opt out of a whole channel (`email`, `sms`, `in_app`) or of a category a sender
tags notifications with (`marketing`, `digest`...). Anything not mentioned is allowed, so a
user who never saved preferences gets everything. A `critical` notification (an interview
reminder, a security notice) is delivered whatever the preferences say: missing it costs the
recipient more than an unwanted message does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preferences:
    """Opt-outs: a name mapped to False is suppressed, to True (or absent) delivered."""

    channels: Mapping[str, bool] = field(default_factory=dict)
    categories: Mapping[str, bool] = field(default_factory=dict)


def suppression_reason(
    prefs: Preferences | None, *, channel: str, category: str | None, critical: bool
) -> str | None:
    """None to deliver, else why not (stored as the notification's reason for `suppressed`)."""
    if critical or prefs is None:
        return None
    if prefs.channels.get(channel, True) is False:
        return f"recipient opted out of {channel}"
    if category is not None and prefs.categories.get(category, True) is False:
        return f"recipient opted out of category '{category}'"
    return None
