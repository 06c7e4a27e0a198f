"""Identifiers: the ones notifyd makes, and the opaque ones it is handed.

Ids notifyd creates are UUIDv7 so that id order is creation order: list queries page by id
(`before=<id>`) and new rows land at the right edge of the primary-key index.

Ids that come from other services (tenants, users, candidates, employers, applications) are
opaque strings: the auth service a team already runs decides their shape (`TEN-0001`,
`auth0|42`, a UUID). notifyd only bounds their length and character set so they stay safe in
logs, Redis keys and URLs.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from dataclasses import dataclass

_last_ms = 0
_last_seq = 0


def uuid7() -> uuid.UUID:
    """A RFC 9562 version 7 UUID, monotonic within this process.

    The 12-bit `rand_a` field carries a counter when two ids share a millisecond, so ids made
    by one process sort in creation order even under a burst.
    """
    global _last_ms, _last_seq
    now_ms = time.time_ns() // 1_000_000
    if now_ms > _last_ms:
        _last_ms = now_ms
        _last_seq = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave room to count up
    else:
        _last_seq += 1
        if _last_seq > 0xFFF:  # counter exhausted: borrow the next millisecond
            _last_ms += 1
            _last_seq = 0
    rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (_last_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= _last_seq << 64
    value |= 0b10 << 62
    value |= rand_b
    return uuid.UUID(int=value)


def parse_uuid(text: str) -> uuid.UUID | None:
    """The UUID spelled by `text`, or None when it is not one (a 404, never a 500)."""
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class OpaqueIdRule:
    """Bounds for ids minted by other services; both are settings."""

    max_length: int
    pattern: re.Pattern[str]

    @classmethod
    def from_settings(cls, max_length: int, allowed_pattern: str) -> OpaqueIdRule:
        return cls(max_length=max_length, pattern=re.compile(allowed_pattern))

    def problem(self, value: object) -> str | None:
        """Why `value` is not an acceptable id, or None when it is."""
        if not isinstance(value, str):
            return "must be a string"
        if not value:
            return "must not be empty"
        if len(value) > self.max_length:
            return f"must be at most {self.max_length} characters"
        if not self.pattern.fullmatch(value):
            return f"may only contain characters matching {self.pattern.pattern}"
        return None
