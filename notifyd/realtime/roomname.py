"""Room names: the derived name of a 1-on-1 room, and what a group room may be called.

User ids are opaque strings from another service and may hold any character the id rule allows
(`_`, `|`, `:`, `.`...), so joining two of them with a separator is ambiguous. The DM name
encodes each id on its own in unpadded base64url, whose alphabet (`A-Z a-z 0-9 - _`) has no
`.`, and joins them with `.`:

    dm.<base64url(utf-8 of the smaller id)>.<base64url(utf-8 of the larger id)>

"Smaller" is plain string order (code points). Every pair has exactly one name, every name
decodes to exactly one pair, and the name is safe in a URL path. Only the canonical form is
accepted (sorted, unpadded, the two ids distinct), so a pair cannot be reached by two names.

Group room names are `[A-Za-z0-9_-]{1,100}`: no `.`, so they can never be taken for a DM name.
"""

from __future__ import annotations

import base64
import binascii
import re

from notifyd import tags

DM_PREFIX = "dm."
GROUP_NAME = tags.ROOM_NAME
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _encode(user_id: str) -> str:
    return base64.urlsafe_b64encode(user_id.encode()).rstrip(b"=").decode()


def _decode(part: str) -> str | None:
    if not _B64URL.fullmatch(part):
        return None
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        text = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return text if _encode(text) == part else None  # refuse non-canonical encodings


def dm_name(user_a: str, user_b: str) -> str:
    """The one room name of the conversation between two distinct users."""
    if user_a == user_b:
        raise ValueError("a 1-on-1 room needs two different users")
    low, high = sorted((user_a, user_b))
    return f"{DM_PREFIX}{_encode(low)}.{_encode(high)}"


def dm_members(name: str) -> tuple[str, str] | None:
    """The two users of a DM room name, or None when `name` is not a canonical DM name."""
    if not name.startswith(DM_PREFIX):
        return None
    parts = name[len(DM_PREFIX) :].split(".")
    if len(parts) != 2:
        return None
    low, high = (_decode(p) for p in parts)
    if low is None or high is None or not low < high:
        return None
    return low, high


def is_group_name(name: str) -> bool:
    return GROUP_NAME.fullmatch(name) is not None
