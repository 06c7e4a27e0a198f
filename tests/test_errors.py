"""Errors and the request edge: every error is RFC 9457 problem+json and changes nothing.

Promises checked: malformed, non-object and empty bodies (400), wrong media type (415), bodies
over the limit (413, nothing stored), unknown routes (404, even without a token), wrong
methods (405 with Allow), unknown fields and wrong types (422 naming the field), internal
errors (500 without a traceback); every response carries an X-Request-ID; the ops endpoints
need no token, /metrics labels requests by route template, /readyz reports a Redis outage.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from scripts.localservers import RedisServer
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

PROBLEM_JSON = "application/problem+json"
SEND = "/notifications/send/"
GOOD = {"notification_type": "in_app", "recipient": "auth0|42", "message": "Hello"}


def assert_problem(status: int, body: Any, headers: Mapping[str, str], expected: int) -> None:
    assert status == expected, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON), headers
    assert isinstance(body, dict), body
    assert body["status"] == expected
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str) and body[key], body
    assert headers["X-Request-ID"]


async def nothing_stored(db: asyncpg.Connection) -> None:
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [
        (b'{"notification_type": "in_app",', "application/json", 400),
        (b"[1, 2, 3]", "application/json", 400),
        (b'"just a string"', "application/json", 400),
        (b"", "application/json", 400),
        (b"   \n", "application/json", 400),
        (b"\xff\xfe not utf-8", "application/json", 400),
        (b'{"notification_type": "in_app"}', "text/plain", 415),
        (b"notification_type=in_app", "application/x-www-form-urlencoded", 415),
    ],
)
async def test_bad_bodies_are_problems(
    api: Api, db: asyncpg.Connection, raw: bytes, content_type: str, expected: int
) -> None:
    status, body, headers = await api.request(
        "POST", SEND, data=raw, headers={"Content-Type": content_type}, role="service"
    )
    assert_problem(status, body, headers, expected)
    await nothing_stored(db)


@pytest.mark.parametrize("idempotent", [False, True])
async def test_body_over_limit_is_413_and_stores_nothing(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, idempotent: bool
) -> None:
    daemon = await daemon_factory(NOTIFYD_MAX_BODY_BYTES="2048")
    headers = {"Idempotency-Key": "big-one"} if idempotent else {}
    async with Api(daemon) as api:
        status, body, answer = await api.post(
            SEND, {**GOOD, "message": "x" * 4096}, role="service", headers=headers
        )
        assert_problem(status, body, answer, 413)
        await nothing_stored(db)
        # just under the limit still works
        status, body, _ = await api.post(SEND, {**GOOD, "message": "x" * 1500}, role="service")
        assert status == 202, body


async def test_unknown_route_is_404_problem_without_token(api: Api) -> None:
    for auth in (False, True):
        status, body, headers = await api.get("/no/such/route/", auth=auth)
        assert_problem(status, body, headers, 404)
    status, body, headers = await api.post("/nothing/here/", GOOD, auth=False)
    assert_problem(status, body, headers, 404)


async def test_wrong_method_is_405_with_allow(api: Api) -> None:
    status, body, headers = await api.request("PUT", "/notifications/", json=GOOD)
    assert_problem(status, body, headers, 405)
    assert "GET" in headers["Allow"]
    status, body, headers = await api.request("DELETE", SEND, auth=False)
    assert_problem(status, body, headers, 405)
    assert "POST" in headers["Allow"]


async def test_missing_token_is_401_problem(api: Api) -> None:
    status, body, headers = await api.post(SEND, GOOD, auth=False)
    assert_problem(status, body, headers, 401)
    assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_unknown_field_is_422_naming_it(api: Api, db: asyncpg.Connection) -> None:
    status, body, headers = await api.post(SEND, {**GOOD, "priority": "high"}, role="service")
    assert_problem(status, body, headers, 422)
    assert [e["field"] for e in body["errors"]] == ["priority"]
    assert all(e["message"] for e in body["errors"])
    await nothing_stored(db)


async def test_wrong_types_are_422_naming_every_field(api: Api, db: asyncpg.Connection) -> None:
    bad = {"notification_type": "pigeon", "recipient": 42, "message": ["x"]}
    status, body, headers = await api.post(SEND, bad, role="service")
    assert_problem(status, body, headers, 422)
    assert {e["field"] for e in body["errors"]} == {"notification_type", "recipient", "message"}
    await nothing_stored(db)


async def test_internal_error_is_500_problem_without_traceback(
    api: Api, db: asyncpg.Connection
) -> None:
    """A broken database (audit table gone) gives a bare 500: no traceback, no SQL, no rows."""
    await db.execute("DROP TABLE audit_log")
    status, body, headers = await api.post(
        "/messages/send/",
        {"receiver_id": "emp-1", "content": "hi"},
        headers={"Idempotency-Key": "doomed"},
    )
    assert_problem(status, body, headers, 500)
    text = str(body)
    for leak in ("Traceback", "audit_log", "asyncpg", "UndefinedTable", 'File "'):
        assert leak not in text, body
    assert body["instance"] == f"urn:request:{headers['X-Request-ID']}"
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    # a failed request does not keep its idempotency key: a retry may run
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


async def test_every_response_has_a_request_id(api: Api) -> None:
    seen = set()
    for method, path, auth in (
        ("GET", "/healthz", False),
        ("GET", "/notifications/", True),
        ("GET", "/notifications/", False),
        ("GET", "/nowhere", False),
        ("PUT", "/notifications/", True),
    ):
        _, _, headers = await api.request(method, path, auth=auth)
        assert headers["X-Request-ID"], (method, path)
        seen.add(headers["X-Request-ID"])
    assert len(seen) == 5


async def test_valid_incoming_request_id_is_echoed_invalid_is_replaced(api: Api) -> None:
    _, _, headers = await api.get("/notifications/", headers={"X-Request-ID": "abc-123.x:y_z"})
    assert headers["X-Request-ID"] == "abc-123.x:y_z"
    status, body, headers = await api.get("/no/such/", headers={"X-Request-ID": "trace-42"})
    assert status == 404
    assert headers["X-Request-ID"] == "trace-42"
    assert body["instance"] == "urn:request:trace-42"
    for bad in ("has space", "x" * 200, "semi;colon"):
        _, _, headers = await api.get("/healthz", auth=False, headers={"X-Request-ID": bad})
        assert headers["X-Request-ID"] != bad
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", headers["X-Request-ID"])


async def test_ops_endpoints_need_no_token(api: Api) -> None:
    status, body, _ = await api.get("/healthz", auth=False)
    assert (status, body) == (200, {"status": "ok"})
    status, body, _ = await api.get("/readyz", auth=False)
    assert status == 200, body
    assert body["checks"] == {"postgresql": "ok", "redis": "ok", "actors": "ok"}
    status, text, headers = await api.get("/metrics", auth=False)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "# TYPE notifyd_http_requests_total counter" in text


async def test_metrics_label_routes_by_template_never_raw_id(api: Api) -> None:
    raw_id = str(uuid.uuid4())
    status, _, _ = await api.get(f"/notifications/{raw_id}/")
    assert status == 404
    status, _, _ = await api.get("/surely/not/a/route/abc")
    assert status == 404
    status, text, _ = await api.get("/metrics", auth=False)
    assert status == 200
    counters: dict[tuple[str, str, str], float] = {}
    for match in re.finditer(r"^notifyd_http_requests_total\{(.*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        counters[labels["route"], labels["method"], labels["status"]] = float(match.group(2))
    assert counters["/notifications/{id}/", "GET", "404"] == 1.0
    assert counters["unmatched", "GET", "404"] == 1.0
    assert raw_id not in text
    assert "/surely/not" not in text
    durations = re.findall(r"^notifyd_http_request_duration_seconds_count\{(.*)\} ", text, re.M)
    assert any('route="/notifications/{id}/"' in labels for labels in durations)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=False)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_readyz_is_503_when_redis_is_down(
    own_redis: RedisServer, daemon_factory: DaemonFactory
) -> None:
    daemon = await daemon_factory(REDIS_URL=own_redis.url())
    async with Api(daemon) as api:
        status, body, _ = await api.get("/readyz", auth=False)
        assert status == 200, body
        await asyncio.to_thread(own_redis.kill)

        async def not_ready() -> bool:
            status, _, _ = await api.get("/readyz", auth=False)
            return status == 503

        await wait_for(not_ready, timeout=15)
        status, body, headers = await api.get("/readyz", auth=False)
        assert status == 503
        assert headers["Content-Type"].startswith("application/json")
        assert body["status"] == "not ready"
        assert body["checks"]["redis"] != "ok"
        assert body["checks"]["postgresql"] == "ok"
        # alive is not ready: the process still answers
        status, body, _ = await api.get("/healthz", auth=False)
        assert status == 200
