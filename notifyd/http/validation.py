"""Reading request bodies and query strings into typed values, naming every field at fault.

A body is read into its model (`notifyd.schemas`) by `read_model`; every problem is answered
in one 422 so a client fixes its request in one round trip. Unknown fields are errors too: a
misspelt optional field silently ignored is a bug the caller never sees. (`Fields`, the
hand-written reader, serves the templates' queries, not yet moved to a model.)
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from notifyd.http.problems import FieldError, Problem, invalid, unsendable
from notifyd.ids import OpaqueIdRule
from notifyd.schemas.errors import Invalid, NotAnObject, Refused
from notifyd.schemas.reader import Reader
from notifyd.schemas.registry import Schemas

M = TypeVar("M", bound=BaseModel)

SCHEMAS = web.AppKey("schemas", Schemas)
"""Every payload's reader, built from the settings once, in `server.build_app`."""


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
    field at fault (validated from the raw bytes: no intermediate dict on the hot path); a
    body only the rules beyond the document refuse: 422 `unsendable`. `also`: what is wrong
    outside the body (the path), in the same 422."""
    raw = await _read_raw(request)
    try:
        found = reader.json(raw)
    except NotAnObject as exc:
        raise Problem(400, exc.detail, kind="malformed-json") from None
    except Refused as exc:  # the document allows the body: unless the path is at fault
        raise (invalid if also else unsendable)([*also, *exc.errors]) from None
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
