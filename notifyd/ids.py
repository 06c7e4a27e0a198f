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

try:  # asyncpg's own UUID, made in C (see uuid7)
    from asyncpg.pgproto.pgproto import UUID as _CUUID

    def _uuid_of(value: int) -> uuid.UUID:
        return _CUUID(value.to_bytes(16, "big"))

except ImportError:  # should asyncpg move it: the standard class is as correct, only slower

    def _uuid_of(value: int) -> uuid.UUID:
        return uuid.UUID(int=value)


_last_ms = 0
_last_seq = 0
# Random bits come from os.urandom (a CSPRNG, as RFC 9562 asks), fetched a few KiB at a time:
# one system call per 512 ids rather than two per id, which showed in profiles of the send
# path (three ids per request).
_RANDOM_CHUNK = 4096
_random = b""
_random_at = 0


def _random_bits(nbytes: int) -> int:
    global _random, _random_at
    if _random_at + nbytes > len(_random):
        _random = os.urandom(_RANDOM_CHUNK)
        _random_at = 0
    start = _random_at
    _random_at += nbytes
    return int.from_bytes(_random[start:_random_at], "big")


def uuid7_int() -> int:
    """A RFC 9562 version 7 UUID as its 128-bit integer, monotonic within this process.

    The 12-bit `rand_a` field carries a counter when two ids share a millisecond, so ids made
    by one process sort in creation order even under a burst.
    """
    global _last_ms, _last_seq
    now_ms = time.time_ns() // 1_000_000
    if now_ms > _last_ms:
        _last_ms = now_ms
        _last_seq = _random_bits(2) & 0x3FF  # leave room to count up
    else:
        _last_seq += 1
        if _last_seq > 0xFFF:  # counter exhausted: borrow the next millisecond
            _last_ms += 1
            _last_seq = 0
    return (
        (_last_ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | _last_seq << 64
        | 0b10 << 62
        | _random_bits(8) & 0x3FFF_FFFF_FFFF_FFFF
    )


def uuid7() -> uuid.UUID:
    """`uuid7_int` as a UUID: asyncpg's own `uuid.UUID` subclass, the type it returns for
    `uuid` columns. It is a UUID in every respect (equal to and hashing as the standard one)
    but made in C, several times cheaper to make and to spell than `uuid.UUID(int=…)`
    (docs/benchmarks.md), and asyncpg encodes it without a Python call. Each send makes two
    ids and spells them several times (answer, Location, audit, stream entry)."""
    return _uuid_of(uuid7_int())


def uuid7_hex() -> str:
    """`uuid7_int` as 32 hex digits (request ids), without making a UUID object."""
    return f"{uuid7_int():032x}"


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
