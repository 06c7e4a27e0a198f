"""One-click unsubscribe links (RFC 8058, issue 29): the signed token, pure logic, no I/O.

A token names the tenant, the recipient (the user id when the notification has one, else
the email address) and the category (empty: the notification had none), and carries a MAC
over them: `<payload>.<mac>`, both base64url without padding. The payload is the fields
joined by a separator no field may contain (ids, addresses and categories are bounded,
printable text), prefixed with a version. The MAC is HMAC-SHA256, cut to 128 bits, keyed
with a key *derived* from NOTIFYD_UNSUBSCRIBE_SECRET (HMAC of a fixed label), so the
setting itself never keys anything another part of notifyd could be made to sign.

A token that does not parse, is longer than TOKEN_MAX, or whose MAC differs is `None`:
the route answers 404 for it, as for any unknown path, and says nothing about which part
was wrong. Verification compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

VERSION: Final = "1"
SEPARATOR: Final = "\x1f"  # ASCII unit separator: never in an id, address or category
MAC_BYTES: Final = 16
KEY_LABEL: Final = b"notifyd one-click unsubscribe v1"
# tenant (≤ 256) + recipient (an address ≤ 320, or an id ≤ 256) + category (≤ 64) and the
# separators, base64 (4/3), plus the MAC: about 900 characters at the very most
TOKEN_MAX: Final = 1024


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Who opts out of what: `user_id` when known, else `address` (exactly one is set)."""

    tenant_id: str
    user_id: str | None
    address: str | None
    category: str  # '' : the notification had none (the whole email channel)


PATH: Final = "/unsubscribe/"


def link(public_url: str, token: str) -> str:
    """The List-Unsubscribe URL of a token (base64url and a dot: nothing to escape)."""
    return f"{public_url.rstrip('/')}{PATH}{token}"


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]


def sign(key: bytes, what: Unsubscribe) -> str | None:
    """The token for `what`, or None when a field cannot be carried (it holds the separator,
    or the token would pass TOKEN_MAX): no link is better than one that cannot work."""
    kind, who = ("u", what.user_id) if what.user_id is not None else ("e", what.address)
    fields = (VERSION, what.tenant_id, kind, who or "", what.category)
    if any(SEPARATOR in field for field in fields) or not who:
        return None
    payload = SEPARATOR.join(fields).encode()
    token = f"{_b64(payload)}.{_b64(_mac(key, payload))}"
    return token if len(token) <= TOKEN_MAX else None


def verify(key: bytes, token: str) -> Unsubscribe | None:
    """What an authentic token names; None for anything else (forged, altered, malformed)."""
    if len(token) > TOKEN_MAX or token.count(".") != 1:
        return None
    encoded, _, mac = token.partition(".")
    try:
        payload = _unb64(encoded)
        given = _unb64(mac)
    except (binascii.Error, ValueError):
        return None
    # canonical encodings only: a character base64 would skip, or other unused bits in the
    # last one, would be an altered token that still verifies
    if _b64(payload) != encoded or _b64(given) != mac:
        return None
    if not hmac.compare_digest(given, _mac(key, payload)):
        return None
    try:
        fields = payload.decode().split(SEPARATOR)
    except UnicodeDecodeError:
        return None
    if len(fields) != 5 or fields[0] != VERSION or fields[2] not in ("u", "e") or not fields[3]:
        return None
    _, tenant_id, kind, who, category = fields
    if kind == "u":
        return Unsubscribe(tenant_id, who, None, category)
    return Unsubscribe(tenant_id, None, who, category)
