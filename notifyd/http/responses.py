"""JSON answers and cursor pagination, shared by every resource module."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

import asyncpg
from aiohttp import web

from notifyd.payloads import dumps


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=dumps(data), content_type="application/json", headers=headers
    )


class Identified(Protocol):
    """A typed row of a list (`store.notifications.Notification`, ...)."""

    @property
    def id(self) -> Any: ...


Row = TypeVar("Row", bound=asyncpg.Record | Identified)


def page(request: web.Request, rows: list[Row], limit: int) -> tuple[list[Row], dict[str, str]]:
    """Trim a page fetched with `limit + 1` rows; link the next page only when one exists.

    The body stays a plain JSON array (as the seeds' clients expect); the cursor travels in
    `Link: <…>; rel="next"`, carrying the last id shown and the caller's other parameters.
    """
    if len(rows) <= limit:
        return rows, {}
    shown = rows[:limit]
    last = shown[-1]
    last_id = last["id"] if isinstance(last, asyncpg.Record) else last.id
    next_url = request.rel_url.update_query({"before": str(last_id), "limit": str(limit)})
    return shown, {"Link": f'<{next_url}>; rel="next"'}


def iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
