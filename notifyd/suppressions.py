"""The suppression list's rules (issue 29): pure logic, no I/O.

An entry names a tenant's address on a channel (`email`: lower-cased; `sms`: E.164, as rows
store it) and either every category (`category` empty) or one. Why it is there decides
whether a `critical` notification still goes: an address that is dead (a hard bounce, a relay's
refusal of the mailbox) or a number whose owner texted STOP (Twilio refuses it, and the law
says so) stops everything; a complaint or an unsubscribe is an opt-out of one category, which
`critical` bypasses as it bypasses preferences.
"""

from __future__ import annotations

from typing import Final, Literal

Reason = Literal["hard_bounce", "smtp_refused", "sms_opt_out", "complaint", "unsubscribe"]

REASONS: Final[tuple[Reason, ...]] = (
    "hard_bounce",
    "smtp_refused",
    "sms_opt_out",
    "complaint",
    "unsubscribe",
)
# what even a critical send cannot pass
STOPS_CRITICAL: Final = frozenset({"hard_bounce", "smtp_refused", "sms_opt_out"})
CHANNELS: Final = ("email", "sms")
ADDRESS_MAX: Final = 320  # RFC 5321's longest path (64 + @ + 255)
SOURCE_MAX: Final = 500
CATEGORY_MAX: Final = 64  # as a notification's category

# Twilio: "Attempt to send to unsubscribed recipient" (the number replied STOP)
TWILIO_OPTED_OUT: Final = "21610"


def address_key(channel: str, address: str) -> str:
    """The address as the list keys it: email case-folded (mailbox providers treat the local
    part case-blind in practice, and one refusal must cover `Ann@` and `ann@`), SMS as is."""
    address = address.strip()
    return address.lower() if channel == "email" else address


def listed_reason(reason: str | None, category: str | None, *, critical: bool) -> str | None:
    """The notification's `suppressed` reason when the list has an entry for its address
    (`reason`, and the entry's category, '' for all), else None to deliver."""
    if reason is None:
        return None
    if critical and reason not in STOPS_CRITICAL:
        return None
    scope = f" for category '{category}'" if category else ""
    return f"address is on the suppression list ({reason}{scope})"


def bounded(text: str, limit: int = SOURCE_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
