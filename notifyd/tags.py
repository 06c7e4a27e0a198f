"""The shapes of what clients write: template keys, categories, locales, email addresses,
and the characters no value that reaches a mail header may hold.

One definition each, so a locale accepted on a template is accepted on a notification, a
reminder contact and a tenant's default alike.
"""

from __future__ import annotations

import re

TEMPLATE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CATEGORY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
LOCALE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")
LOCALE_MAX_LENGTH = 35
ROOM_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
"""A group chat room's name (a 1-on-1 room's has a dot: `realtime.roomname`)."""
EMAIL = re.compile(
    r"[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)

# Characters no value that reaches a mail header (subject, recipient, a contact's name) may
# hold: every C0 control but tab (a header's own whitespace), DEL, every C1 control and the
# Unicode line and paragraph separators. Python's email package starts a new header line at
# \x0b, \x0c, \x1c-\x1e, \x85, \u2028 and \u2029 as well as at CR and LF, so any of them
# can smuggle a header of its own ("Hello\x0cReply-To\t: x@evil.test").
HEADER_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def header_problem(value: str) -> str | None:
    """Why `value` may not reach a mail header, or None when it may."""
    found = HEADER_UNSAFE.search(value)
    if found is None:
        return None
    return (
        "must be a single line, without line breaks or other control characters "
        f"(found {found.group()!r})"
    )


def is_email(text: str) -> bool:
    """A plain addr-spec (no display name): what a relay will accept as RCPT TO."""
    return len(text) <= 254 and EMAIL.fullmatch(text) is not None


def is_locale(locale: str) -> bool:
    """A BCP 47-like tag such as `en`, `pt-BR` or `pt_BR` (the models say it as
    `schemas.fields.LOCALE_PATTERN`; kept for `bench/validation_cost.py`'s old reader)."""
    return len(locale) <= LOCALE_MAX_LENGTH and LOCALE.fullmatch(locale) is not None


def normalize_locale(locale: str) -> str:
    """One spelling per locale: `_` → `-`, language lowercase, region uppercase, script title.

    `pt_br` → `pt-BR`, `zh-hant-tw` → `zh-Hant-TW`; `''` stays `''`.
    """
    parts = locale.strip().replace("_", "-").split("-")
    out = [parts[0].lower()]
    for part in parts[1:]:
        if len(part) == 2 and part.isalpha():
            out.append(part.upper())
        elif len(part) == 4 and part.isalpha():
            out.append(part.title())
        else:
            out.append(part.lower())
    return "-".join(out)
