"""Reading request bodies and query strings into typed values, naming every field at fault.

A body is read into its model (`notifyd.schemas`) by `read_model`; every problem is answered
in one 422 so a client fixes its request in one round trip. Unknown fields are errors too: a
misspelt optional field silently ignored is a bug the caller never sees. (`Fields`, the
hand-written reader, serves the routes not yet moved to a model.)
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel

from notifyd.http.problems import FieldError, Problem, invalid
from notifyd.ids import OpaqueIdRule
from notifyd.schemas.errors import Invalid, NotAnObject
from notifyd.schemas.reader import Reader
from notifyd.schemas.registry import Schemas
from notifyd.tags import is_email as is_email  # one email rule for every entry point

M = TypeVar("M", bound=BaseModel)

SCHEMAS = web.AppKey("schemas", Schemas)
"""Every payload's reader, built from the settings once, in `server.build_app`."""

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def schemas(request: web.Request) -> Schemas:
    return request.app[SCHEMAS]


async def _read_raw(request: web.Request) -> bytes:
    """The body's bytes, not empty; 415 for a media type other than JSON."""
    declared = "Content-Type" in request.headers  # aiohttp reports octet-stream when absent
    if (
        declared
        and request.content_type != "application/json"
        and not (request.content_type.endswith("+json"))
    ):
        raise Problem(
            415,
            f"send the body as application/json, not {request.content_type}",
            kind="unsupported-media-type",
        )
    raw = await request.read()  # aiohttp enforces client_max_size (413) here
    if not raw.strip():
        raise Problem(400, "the request body is empty; send a JSON object", kind="malformed-json")
    return raw


async def read_model(request: web.Request, reader: Reader[M], also: Sequence[FieldError] = ()) -> M:
    """The body read into `reader`'s model; 400 unless it is a JSON object, 422 naming every
    field at fault (validated from the raw bytes: no intermediate dict on the hot path).
    `also`: what is wrong outside the body (the path), in the same 422."""
    raw = await _read_raw(request)
    try:
        found = reader.json(raw)
    except NotAnObject as exc:
        raise Problem(400, exc.detail, kind="malformed-json") from None
    except Invalid as exc:
        raise invalid([*also, *exc.errors]) from None
    if also:
        raise invalid(list(also))
    return found


def read_query(request: web.Request, reader: Reader[M]) -> M:
    """The query string read into `reader`'s model (the first of a repeated parameter); 422
    naming every parameter at fault."""
    try:
        return reader.python({key: request.query[key] for key in request.query})
    except Invalid as exc:
        raise invalid(exc.errors) from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for malformed JSON, 415 for another media type."""
    raw = await _read_raw(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Problem(400, f"the body is not valid JSON: {exc}", kind="malformed-json") from None
    if not isinstance(body, dict):
        raise Problem(400, "the body must be a JSON object", kind="malformed-json")
    return body


def parse_rfc3339(text: str) -> datetime | None:
    """A timezone-aware datetime, or None unless `text` is RFC 3339 with an explicit offset."""
    if not _RFC3339.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None


class Fields:
    """Typed access to a JSON object's fields, collecting every error before raising."""

    def __init__(self, data: Mapping[str, Any], id_rule: OpaqueIdRule, *, strict: bool = True):
        self._data = data
        self.id_rule = id_rule
        self._strict = strict
        self._seen: set[str] = set()
        self.errors: list[FieldError] = []

    def error(self, name: str, message: str) -> None:
        self.errors.append(FieldError(name, message))

    def _get(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        value = self._data.get(name)
        if value is None and required:
            self.error(name, "is required")
        return value

    def string(
        self, name: str, *, required: bool = True, max_length: int, allow_empty: bool = False
    ) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(name, "must be a string")
            return None
        if not allow_empty and not value.strip():
            self.error(name, "must not be empty")
            return None
        if len(value) > max_length:
            self.error(name, f"must be at most {max_length} characters")
            return None
        if "\x00" in value:
            self.error(name, "must not contain NUL characters")
            return None
        return value

    def choice(self, name: str, options: Collection[str], *, required: bool = True) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, str) or value not in options:
            self.error(name, f"must be one of: {', '.join(options)}")
            return None
        return value

    def choices(
        self, name: str, options: Collection[str], *, required: bool = False
    ) -> list[str] | None:
        """A list of distinct values, each one of `options`."""
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(name, f"must be a list of: {', '.join(options)}")
            return None
        unknown = [v for v in value if v not in options]
        if unknown:
            self.error(name, f"unknown {unknown[0]!r}; choose from: {', '.join(options)}")
            return None
        return list(dict.fromkeys(value))

    def opaque_id(self, name: str, *, required: bool = True) -> str | None:
        value = self._get(name, required)
        if value is None:
            return None
        problem = self.id_rule.problem(value)
        if problem is not None:
            self.error(name, problem)
            return None
        assert isinstance(value, str)
        return value

    def timestamp(self, name: str, *, required: bool = True) -> datetime | None:
        value = self._get(name, required)
        if value is None:
            return None
        parsed = parse_rfc3339(value) if isinstance(value, str) else None
        if parsed is None:
            self.error(name, "must be an RFC 3339 time with an offset, e.g. 2026-03-10T10:00:00Z")
        return parsed

    def mapping(self, name: str, *, required: bool = False, max_keys: int) -> dict[str, Any] | None:
        value = self._get(name, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(name, "must be a JSON object")
            return None
        if len(value) > max_keys:
            self.error(name, f"must have at most {max_keys} keys")
            return None
        return value

    def page_limit(self, default: int, maximum: int) -> int:
        value = self._get("limit", False)
        if value is None:
            return default
        try:
            limit = int(value)
        except (TypeError, ValueError):
            self.error("limit", "must be an integer")
            return default
        if not 1 <= limit <= maximum:
            self.error("limit", f"must be between 1 and {maximum}")
            return default
        return limit

    def done(self) -> None:
        """Raise one 422 for everything wrong, unknown fields included."""
        if self._strict:
            for name in self._data:
                if name not in self._seen:
                    self.error(name, "is not a known field")
        if self.errors:
            raise invalid(self.errors)


def query_fields(request: web.Request, id_rule: OpaqueIdRule) -> Fields:
    """Query parameters; unknown ones are ignored (proxies and caches add their own)."""
    single = {key: request.query.get(key) for key in request.query}
    return Fields(single, id_rule, strict=False)
