"""Versioned stream payloads, encoded with orjson in one place.

Every entry on a stream is a frozen dataclass with a schema version, so a rolling upgrade can
tell an old entry from a new one instead of guessing from the fields present.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

INTENT_VERSION = 1


def _notification_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise PayloadError(f"names no notification: {text!r}") from None


class PayloadError(ValueError):
    """A stream entry that cannot be decoded: it goes to the dead-letter stream."""


@dataclass(frozen=True, slots=True)
class NotificationIntent:
    """A stored notification that needs dispatching; the row in PostgreSQL holds the rest."""

    tenant_id: str
    notification_id: str
    reason: str = "created"  # created | requeued | retry
    version: int = INTENT_VERSION

    @property
    def uuid(self) -> uuid.UUID:
        return _notification_uuid(self.notification_id)

    def to_fields(self) -> dict[str, str]:
        return {"v": str(self.version), "data": dumps(self._as_dict()).decode()}

    def _as_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "notification_id": self.notification_id,
            "reason": self.reason,
        }

    @classmethod
    def from_fields(cls, entry: dict[bytes, bytes]) -> NotificationIntent:
        try:
            version = int(entry[b"v"])
            data = orjson.loads(entry[b"data"])
            if version != INTENT_VERSION:
                raise PayloadError(f"unsupported intent version {version}")
            return cls(
                tenant_id=str(data["tenant_id"]),
                notification_id=str(data["notification_id"]),
                reason=str(data.get("reason", "created")),
                version=version,
            )
        except (KeyError, ValueError, TypeError, orjson.JSONDecodeError) as exc:
            if isinstance(exc, PayloadError):
                raise
            raise PayloadError(f"malformed intent: {exc!r}") from exc


DELIVERY_VERSION = 1


@dataclass(frozen=True, slots=True)
class DeliveryRef:
    """One delivery for a channel sender; the row holds the rendered content."""

    tenant_id: str
    notification_id: str
    version: int = DELIVERY_VERSION

    @property
    def uuid(self) -> uuid.UUID:
        return _notification_uuid(self.notification_id)

    def to_fields(self) -> dict[str, str]:
        return {"v": str(self.version), "tenant_id": self.tenant_id, "id": self.notification_id}

    @classmethod
    def from_fields(cls, entry: dict[bytes, bytes]) -> DeliveryRef:
        try:
            version = int(entry[b"v"])
            if version != DELIVERY_VERSION:
                raise PayloadError(f"unsupported delivery version {version}")
            return cls(entry[b"tenant_id"].decode(), entry[b"id"].decode(), version)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, PayloadError):
                raise
            raise PayloadError(f"malformed delivery: {exc!r}") from exc


def json_default(value: Any) -> Any:
    """What orjson cannot encode itself: asyncpg's UUIDs (the type of every id notifyd makes
    and reads back) are not `uuid.UUID` exactly, so orjson hands them here."""
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    """The one JSON encoder: datetimes natively, UUIDs of either kind as their string (as
    values: keys must be strings, for orjson hands keys to no `default`)."""
    return orjson.dumps(value, default=json_default, option=orjson.OPT_NON_STR_KEYS)


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)
