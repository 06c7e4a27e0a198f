"""Bounces and complaints (issue 29): VERP return paths and what a report says, no I/O.

Every email's envelope sender (its Return-Path once delivered) is
`bounce+<id>@NOTIFYD_BOUNCE_DOMAIN`, `<id>` the notification's UUID in base64url (22
characters), so a bounce names its notification whatever the bouncing server quotes of it.
The path is not signed: what it gives is only which row to look at, and a report changes
that row only when the failure it reports names the row's own recipient (a DSN's
Final-Recipient / Original-Recipient, found by flufl.bounce) or, for a complaint, when it is
an ARF report (RFC 5965) about it. Someone who knows a notification's id and its recipient
(its recipient does: X-Notifyd-Id) can at most report that recipient's address as dead.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from email.message import Message
from typing import Final

from flufl.bounce import all_failures

LOCAL_PREFIX: Final = "bounce+"
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{22}")


def return_path(domain: str, notification_id: str) -> str:
    token = base64.urlsafe_b64encode(uuid.UUID(notification_id).bytes).rstrip(b"=").decode()
    return f"{LOCAL_PREFIX}{token}@{domain}"


def notification_of(address: str, domain: str) -> uuid.UUID | None:
    """The notification a VERP address names; None for any other address."""
    local, at, host = address.strip().strip("<>").rpartition("@")
    if not at or host.lower() != domain.lower() or not local.lower().startswith(LOCAL_PREFIX):
        return None
    token = local[len(LOCAL_PREFIX) :]
    if not _TOKEN.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "==")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != token:
        return None
    return uuid.UUID(bytes=raw)


@dataclass(frozen=True, slots=True)
class Report:
    """What one message to the bounce domain says: addresses failed for good, for now, and
    whether it is a complaint (ARF feedback report)."""

    permanent: frozenset[str]
    temporary: frozenset[str]
    complaint: bool


def _addresses(found: frozenset[bytes] | set[bytes]) -> frozenset[str]:
    return frozenset(a.decode("utf-8", "replace").strip().lower() for a in found)


def read_report(message: Message) -> Report:
    """A DSN (RFC 3464, and the Postfix, Exim, qmail... formats flufl.bounce knows) or an ARF
    complaint (multipart/report; report-type=feedback-report)."""
    complaint = (
        message.get_content_type() == "multipart/report"
        and str(message.get_param("report-type", "")).lower() == "feedback-report"
    )
    if complaint:
        return Report(frozenset(), frozenset(), True)
    temporary, permanent = all_failures(message)
    return Report(_addresses(permanent), _addresses(temporary), False)
