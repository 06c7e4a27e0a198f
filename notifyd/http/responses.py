"""JSON answers and cursor pagination, shared by every resource module."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from notifyd.payloads import dumps


def json_response(
    data: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=dumps(data), content_type="application/json", headers=headers
    )


def page_headers(
    request: web.Request, rows: Sequence[Any], limit: int, last_id: uuid.UUID | None
) -> dict[str, str]:
    """A `Link: <…>; rel="next"` when the page is full; the body stays a plain JSON array."""
    if len(rows) < limit or last_id is None:
        return {}
    next_url = request.rel_url.update_query({"before": str(last_id), "limit": str(limit)})
    return {"Link": f'<{next_url}>; rel="next"'}


def iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
