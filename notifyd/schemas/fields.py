"""The kinds of field payloads are made of, as pydantic annotations: text, ids, channels.

A field's rule is a JSON Schema keyword wherever one can say it (`maxLength`, `pattern`,
`enum`), so the document shows the rule the server applies. `PATTERN_MESSAGES` says what a
value that misses each pattern is told (`errors.message`).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, Field, StrictBool, create_model

from notifyd import tags
from notifyd.settings import CHANNELS, Settings

# What Python's str.strip() removes, spelt out: the same class in pydantic-core's Rust regex,
# in Python's `re` (schemathesis) and in ECMA-262 (JSON Schema), where `\s` differs.
_SPACE = r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT_PATTERN = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
"""Text: at least one character that is not white space, and no NUL (PostgreSQL refuses it)."""

_UNSAFE = tags.HEADER_UNSAFE.pattern.removeprefix("[").removesuffix("]")
HEADER_TEXT_PATTERN = rf"^[^{_UNSAFE}]*[^{_UNSAFE}{_SPACE}][^{_UNSAFE}]*$"
"""Text that reaches a mail header: `TEXT_PATTERN`, and no character of `tags.HEADER_UNSAFE`."""

SAFE_EMAIL = tags.EMAIL.pattern.replace(r"[^@\s<>\"',;]", rf"[^@\s<>\"',;{_UNSAFE}]", 1)
assert tags.EMAIL.pattern != SAFE_EMAIL, "tags.EMAIL's local part changed: update SAFE_EMAIL"
"""`tags.EMAIL`, header-safe (unanchored): a From: address, a contact's email."""

SPACES = rf"[{_SPACE}]*"
"""Any white space, as `str.strip()` takes it off (around a recipient)."""

Channel = Literal["email", "sms", "in_app"]
"""A delivery channel: `settings.CHANNELS`, as a type."""
assert get_args(Channel) == CHANNELS, "Channel and settings.CHANNELS name the same channels"

Flag = StrictBool
"""true or false in a JSON body; a string "true" is refused there (query strings: `QueryFlag`)."""


def anchored(pattern: str) -> str:
    """A `re.fullmatch` pattern as a JSON Schema `pattern` (which matches anywhere)."""
    return f"^(?:{pattern})$"


TEMPLATE_KEY_PATTERN = anchored(tags.TEMPLATE_KEY.pattern)
CATEGORY_PATTERN = anchored(tags.CATEGORY.pattern)
LOCALE_PATTERN = anchored(tags.LOCALE.pattern)


def _header_message(value: str) -> str:
    return tags.header_problem(value) or "must not be empty"


Message = str | Callable[[str], str]
"""What a value that misses a pattern is told: fixed, or made from the value."""

PATTERN_MESSAGES: dict[str, Message] = {
    TEXT_PATTERN: "must not be empty",
    HEADER_TEXT_PATTERN: _header_message,
    TEMPLATE_KEY_PATTERN: "may contain letters, digits and _ . : - only",
    CATEGORY_PATTERN: "may contain letters, digits and _ . : - only",
    LOCALE_PATTERN: "must be a language tag such as en or pt-BR",
}

TemplateKey = Annotated[str, Field(pattern=TEMPLATE_KEY_PATTERN)]
Category = Annotated[str, Field(pattern=CATEGORY_PATTERN)]
Locale = Annotated[str, Field(max_length=tags.LOCALE_MAX_LENGTH, pattern=LOCALE_PATTERN)]


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def parse_rfc3339(text: str) -> datetime | None:
    """A timezone-aware datetime, or None unless `text` is RFC 3339 with an explicit offset."""
    if not _RFC3339.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None


def text(max_length: int, description: str | None = None, *, header: bool = False) -> object:
    """A text field's bounds: `Annotated[str, text(n)]`; `header`: it reaches a mail header."""
    pattern = HEADER_TEXT_PATTERN if header else TEXT_PATTERN
    return Field(max_length=max_length, pattern=pattern, description=description)


def opaque_id(max_length: int, pattern: str, description: str | None = None) -> object:
    """An id minted by another service (users, tenants): `settings.id_max_length` and
    `settings.id_pattern`, the same rule as `ids.OpaqueIdRule`."""
    re.compile(pattern)  # the settings checked it; fail here, at start-up, if not
    return Field(
        min_length=1, max_length=max_length, pattern=anchored(pattern), description=description
    )


def id_pattern_message(pattern: str) -> dict[str, Message]:
    """The `PATTERN_MESSAGES` entry for the configured id pattern (as `OpaqueIdRule` says it)."""
    return {anchored(pattern): f"may only contain characters matching {pattern}"}


class PageQuery(BaseModel):
    """A page of a list, newest first: `limit` items before the cursor `before`. Unknown
    parameters are ignored (proxies and caches add their own)."""

    limit: int = 50
    before: uuid.UUID | None = Field(
        None, description="Cursor: the last id of the previous page (see the Link header)."
    )


B = TypeVar("B", bound=BaseModel)
Q = TypeVar("Q", bound=BaseModel)


def bounded(model: type[B], **fields: Any) -> type[B]:
    """`model` again, under its own name, with `fields` (name → (type, default)) replacing
    its own: how a limit that is a setting gets into a model, once, at start-up."""
    return create_model(model.__name__, __base__=model, __module__=model.__module__, **fields)


def optional_id(
    settings: Settings, alias: str | None = None, description: str | None = None
) -> Any:
    """(type, default) of an optional opaque id field, for `bounded`."""
    rule = opaque_id(settings.id_max_length, settings.id_pattern)
    return Annotated[str, rule] | None, Field(None, alias=alias, description=description)


def with_ids(model: type[B], settings: Settings, *names: str) -> type[B]:
    """`model` with the id rule on its optional id fields `names` (a list query's filters)."""
    return bounded(model, **{name: optional_id(settings) for name in names})


def id_list(settings: Settings) -> Any:
    """(type, default) of an optional list of UUIDs, `settings.mark_read_max_ids` long at most."""
    return Annotated[list[uuid.UUID], Field(max_length=settings.mark_read_max_ids)] | None, None


def paged(model: type[Q], settings: Settings) -> type[Q]:
    """`model` with the page sizes that are settings (`page_size_default`, `page_size_max`) on
    its `limit`."""
    limit = Annotated[int, Field(ge=1, le=settings.page_size_max)]
    return bounded(model, limit=(limit, settings.page_size_default))


def _whole(value: Any) -> Any:
    """JSON has one kind of number: 587.0 is the integer the document's `integer` allows
    (a bool or a string still is not one)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WHOLE = BeforeValidator(_whole)
"""After a `StrictInt` and its bounds (`Annotated[StrictInt, Field(ge=…), WHOLE]`): an integer
as JSON Schema's `integer` means it, 3 and 3.0, never true or "3". After the bounds, so the
document states them as `minimum` and `maximum`."""
