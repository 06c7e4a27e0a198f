"""The one error type every entry point reports (REST 422s, `notifyd send`, ingested events),
and the translation of pydantic's errors into it, in the words clients have always seen."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import ErrorDetails


@dataclass(frozen=True, slots=True)
class FieldError:
    """One thing wrong with a request, named by its field in the REST body's terms
    (`recipient`, `ids[3]`, `recipients[0].email`)."""

    field: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class Invalid(Exception):
    """A payload with at least one field at fault; `errors` names every one of them."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = list(errors)


class Refused(Invalid):
    """A payload the document allows but a rule it cannot state refuses: a time that must be
    ahead of now, a comparison between two fields. REST answers it 422 `unsendable`."""


class NotAnObject(Exception):
    """The payload is not a JSON object at all (malformed JSON, an array...): no field to name,
    so REST answers 400, not 422. `detail` says what is wrong."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


NAME_PART_MAX_LENGTH = 64
"""A key a client chose is echoed in a field name up to this many characters."""


def field_name(loc: Iterable[int | str]) -> str:
    """`("ids", 3)` → `ids[3]`; `("recipients", 0, "email")` → `recipients[0].email`; a
    mapping's key at fault (`("channels", "fax", "[key]")`) → `channels.fax`."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part != "[key]":
            part = part[:NAME_PART_MAX_LENGTH]
            name += f".{part}" if name else part
    return name


def _choices(expected: str) -> str:
    """pydantic's `'email', 'sms' or 'in_app'` → `email, sms, in_app`."""
    return expected.replace("'", "").replace(" or ", ", ")


Patterns = Mapping[str, str | Callable[[str], str]]
"""Per regular expression a model uses, what a value that misses it is told (or how to say it)."""


def message(error: ErrorDetails, patterns: Patterns) -> str:
    """What a client reads for one pydantic error. `patterns` says, per regular expression a
    model uses, what a value that does not match it is told."""
    kind = error["type"]
    ctx = error.get("ctx", {})
    value = error.get("input")
    if kind == "missing" or (value is None and kind.endswith("_type") and len(error["loc"]) == 1):
        return "is required"  # a null is an absent field
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "string_type":
        return "must be a string"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "string_pattern_mismatch" and isinstance(value, str):
        pattern = str(ctx.get("pattern", ""))
        said = patterns.get(pattern, f"must match {pattern}")
        if not isinstance(said, str):
            return said(value)  # it names the character at fault itself (a NUL is one)
        if "\x00" in value:
            return "must not contain NUL characters"
        if not value.strip():
            return "must not be empty"
        return said
    if kind == "literal_error":
        return f"must be one of: {_choices(str(ctx['expected']))}"
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a JSON object"
    if kind == "too_long":
        unit = "keys" if isinstance(value, dict) else "items"
        return f"must have at most {ctx['max_length']} {unit}"
    if kind == "too_short":
        if ctx["min_length"] == 1 and isinstance(value, list):
            return "must be a non-empty list"
        return f"must have at least {ctx['min_length']} items"
    if kind == "list_type":
        return "must be a list"
    if kind in ("uuid_type", "uuid_parsing"):
        return "must be an id (UUID)"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    text = error["msg"]
    return text[:1].lower() + text[1:]


def field_errors(exc: ValidationError, patterns: Patterns) -> list[FieldError]:
    """Every field at fault in `exc`, one error per field (the first pydantic found)."""
    found: dict[str, FieldError] = {}
    for error in exc.errors(include_url=False):
        name = field_name(error["loc"])
        if name not in found:
            found[name] = FieldError(name, message(error, patterns))
    return list(found.values())


def not_an_object(exc: ValidationError) -> NotAnObject | None:
    """`NotAnObject` when pydantic refused the payload as a whole (bad JSON, not an object)."""
    for error in exc.errors(include_url=False):
        if error["loc"]:
            continue
        if error["type"] == "json_invalid":
            return NotAnObject(f"the body is not valid JSON: {error['ctx']['error']}")
        return NotAnObject("the body must be a JSON object")
    return None
