"""`Reader`: one model's validator, built once, turning pydantic's answer into `FieldError`s."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from notifyd.schemas.errors import (
    FieldError,
    Invalid,
    Patterns,
    Refused,
    field_errors,
    not_an_object,
)

M = TypeVar("M", bound=BaseModel)

Rules = Callable[[Mapping[str, Any], Collection[str]], list[FieldError]]
"""The rules across fields: (values, fields already at fault) → what else is wrong."""


def _no_rules(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    return []


class Reader(Generic[M]):
    """Validates a payload into `model`, reporting every field at fault in one `Invalid`.

    The fields are pydantic's (one pass in Rust, from the raw bytes when there are bytes);
    `rules` run after it, also when some field failed (over the fields that did not), so one
    answer still lists everything wrong. `refusals` are the rules the document cannot state
    (the JSON Schema says `rules` too): with other faults they join the one `Invalid`; alone,
    they raise `Refused`, which REST answers as a 422 of its own type (`unsendable`).
    """

    def __init__(
        self,
        model: type[M],
        patterns: Patterns,
        rules: Rules = _no_rules,
        refusals: Rules = _no_rules,
    ) -> None:
        self.model = model
        self._patterns = patterns
        self._rules = rules
        self._refusals = None if refusals is _no_rules else refusals  # the send has none

    def json(self, raw: bytes) -> M:
        """From a JSON document; `NotAnObject` when it is not a JSON object at all."""
        try:
            found = self.model.model_validate_json(raw)
        except ValidationError as exc:
            whole = not_an_object(exc)
            if whole is not None:
                raise whole from None
            raise self._invalid(exc, orjson.loads(raw)) from None
        return self._checked(found)

    def python(self, data: Mapping[str, Any]) -> M:
        """From values already decoded (a query string, the CLI's options, an event)."""
        try:
            found = self.model.model_validate(data)
        except ValidationError as exc:
            raise self._invalid(exc, data) from None
        return self._checked(found)

    def _checked(self, found: M) -> M:
        errors = self._rules(found.__dict__, ())
        if self._refusals is None:
            if errors:
                raise Invalid(errors)
            return found
        refused = self._refusals(found.__dict__, ())
        if errors:
            raise Invalid(errors + refused)
        if refused:
            raise Refused(refused)
        return found

    def _invalid(self, exc: ValidationError, data: Mapping[str, Any]) -> Invalid:
        errors = field_errors(exc, self._patterns)
        at_fault = {e.field.partition("[")[0].partition(".")[0] for e in errors}
        values = {k: v for k, v in data.items() if k in self.model.model_fields}
        errors += self._rules(values, at_fault)
        if self._refusals is not None:
            errors += self._refusals(values, at_fault)
        return Invalid(errors)
