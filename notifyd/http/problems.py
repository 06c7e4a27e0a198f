"""RFC 9457 problem details: the one shape every error answer takes."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from notifyd.payloads import dumps
from notifyd.schemas.errors import FieldError

__all__ = [
    "UNSENDABLE",
    "FieldError",
    "Problem",
    "forbidden",
    "invalid",
    "not_found",
    "response",
    "unsendable",
]

PROBLEM_TYPE = "application/problem+json"
TYPE_BASE = "urn:notifyd:problem:"


class Problem(Exception):
    """Raise from anywhere in a handler; the edge middleware turns it into a response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        title: str | None = None,
        errors: list[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors or []
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})  # RFC 9457 extension members

    def body(self, instance: str | None = None) -> dict[str, Any]:
        document: dict[str, Any] = {
            "type": f"{TYPE_BASE}{self.kind}" if self.kind else "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            document["instance"] = instance
        document.update(self.extensions)
        if self.errors:
            document["errors"] = [error.as_json() for error in self.errors]
        return document


UNSENDABLE = "unsendable"
"""The kind of a 422 for a body the document allows that the tenant's state cannot serve:
no such template, a number that is not one in the tenant's region, an email template without
a subject. /openapi.json says so on the 422; the fuzz test tells it from a schema violation."""


def invalid(errors: list[FieldError], detail: str | None = None) -> Problem:
    """422 naming every field at fault."""
    if detail is None:
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return Problem(422, detail, kind="validation", title="Invalid request", errors=errors)


def unsendable(errors: list[FieldError]) -> Problem:
    """422 for a well-formed send that cannot be sent as asked (`UNSENDABLE`)."""
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return Problem(422, detail, kind=UNSENDABLE, title="Cannot send as asked", errors=errors)


def not_found(what: str) -> Problem:
    return Problem(404, f"{what} not found", kind="not-found")


def forbidden(detail: str) -> Problem:
    return Problem(403, detail, kind="forbidden")


def response(problem: Problem, request_id: str | None = None) -> web.Response:
    headers = dict(problem.headers)
    return web.Response(
        status=problem.status,
        body=dumps(problem.body(request_id and f"urn:request:{request_id}")),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )
