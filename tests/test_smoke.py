"""The walking skeleton: a daemon against real PostgreSQL and Redis answers the seed routes."""

from __future__ import annotations

from tests.helpers import Api


async def test_in_app_notification_round_trip(api: Api) -> None:
    status, body, headers = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "auth0|42", "message": "Hello"},
        tenant="TEN-0001",
        user="svc",
        role="service",
    )
    assert status == 202, body
    assert body["status"] == "queued"
    status, listed, headers = await api.get(
        "/api/notifications/", tenant="TEN-0001", user="auth0|42"
    )
    assert status == 200
    assert [n["id"] for n in listed] == [body["notification_id"]]
    assert headers["X-Unread-Count"] == "1"


async def test_healthz_needs_no_token(api: Api) -> None:
    status, body, _ = await api.get("/healthz", auth=False)
    assert (status, body) == (200, {"status": "ok"})
