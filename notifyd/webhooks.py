"""Outbound webhooks as the Standard Webhooks specification says them (standardwebhooks.com).

What a tenant's receiver gets, for one event:
- body `{"type", "timestamp", "data"}` (UTF-8 JSON): the event type, when it happened (RFC 3339)
  and what it is about;
- `webhook-id`: the delivery's id (a UUIDv7), the same on every attempt and replay, so a
  receiver deduplicates by it;
- `webhook-timestamp`: this attempt's time, whole seconds since the epoch (receivers refuse
  one more than 5 minutes off);
- `webhook-signature`: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed with the
  endpoint's secret `whsec_<base64>`; while a rotated secret still signs, both signatures,
  space separated (every verifier library accepts a request any of them matches).

Signing is the `standardwebhooks` package's own `Webhook.sign`, so what its `verify` (and the
other languages' libraries) check is what was signed.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the specification asks for 24 to 64 random bytes

ATTEMPTS_KEPT = 50  # a delivery's attempt log keeps its latest attempts only


def new_secret() -> str:
    """A fresh endpoint secret, `whsec_` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def body(event_type: str, occurred_at: datetime, data: Any) -> bytes:
    """The request body; the same bytes for the same row on every attempt."""
    stamp = occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"type": event_type, "timestamp": stamp, "data": data})


def signature(secrets_: Sequence[str], msg_id: str, at: datetime, payload: bytes) -> str:
    """`webhook-signature`: one `v1,<base64>` per secret (the current one first)."""
    text = payload.decode("utf-8")
    return " ".join(Webhook(secret).sign(msg_id, at, text) for secret in secrets_)


def headers(
    secrets_: Sequence[str], msg_id: str, payload: bytes, user_agent: str
) -> dict[str, str]:
    """An attempt's headers, timestamped now."""
    at = datetime.now(UTC).replace(microsecond=0)
    return {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(secrets_, msg_id, at, payload),
    }
