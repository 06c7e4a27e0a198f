"""Reading request bodies and query strings into typed values, naming every field at fault.

A body is read into its model (`notifyd.schemas`) by `read_model`; every problem is answered
in one 422 so a client fixes its request in one round trip. Unknown fields are errors too: a
misspelt optional field silently ignored is a bug the caller never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from notifyd.http.problems import FieldError, Problem, invalid, unsendable
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


def read_query(request: web.Request, reader: Reader[M], also: Sequence[FieldError] = ()) -> M:
    """The query string read into `reader`'s model (the first of a repeated parameter); 422
    naming every parameter at fault. `also`: what is wrong with the path, in the same 422."""
    try:
        found = reader.python({key: request.query[key] for key in request.query})
    except Invalid as exc:
        raise invalid([*also, *exc.errors]) from None
    if also:
        raise invalid(list(also))
    return found
