"""`Idempotency-Key` on POST: the first result is replayed, never run twice.

Promises checked: the same key and body replay the first status and body (marked
`Idempotent-Replayed: true`) and store one row; a different body is a 422; keys are scoped to
tenant and caller; concurrent duplicates create one row (others get the replay or 409); a
request that failed does not burn its key; a crashed (stale) claim is taken over; expired
keys are purged by the housekeeper and then run anew.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from notifyd.actors.housekeeper import Housekeeper
from tests.helpers import Api

TENANT = "TEN-0001"
SERVICE = "svc-1"
PROBLEM_JSON = "application/problem+json"


def in_app(recipient: str = "auth0|42", message: str = "Hello") -> dict[str, Any]:
    return {"notification_type": "in_app", "recipient": recipient, "message": message}


def reminder_body() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "application_id": "app-1",
        "candidate_id": "cand-1",
        "employer_id": "emp-1",
        "interview_time": (now + timedelta(days=2)).isoformat(),
        "reminder_time": (now + timedelta(days=1)).isoformat(),
    }


async def send(
    api: Api,
    key: str,
    body: Any,
    path: str = "/notifications/send/",
    **kw: Any,
) -> tuple[int, Any, Any]:
    kw.setdefault("user", SERVICE)
    kw.setdefault("role", "service")
    return await api.post(path, body, headers={"Idempotency-Key": key}, **kw)


async def count(db: asyncpg.Connection, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        yield created
    finally:
        await created.close()


@pytest.mark.parametrize(
    ("path", "role", "table", "expected_status"),
    [
        ("/notifications/send/", "service", "notifications", 202),
        ("/api/notifications/send/", "user", "notifications", 202),
        ("/messages/send/", "user", "messages", 201),
        ("/reminders/create/", "service", "interview_reminders", 201),
    ],
)
async def test_same_key_same_body_replays_first_response(
    api: Api, db: asyncpg.Connection, path: str, role: str, table: str, expected_status: int
) -> None:
    if path.startswith("/messages"):
        body: Any = {"receiver_id": "emp-1", "content": "hi"}
    elif path.startswith("/reminders"):
        body = reminder_body()
    else:
        body = in_app()
    first = await send(api, "key-1", body, path, role=role)
    second = await send(api, "key-1", body, path, role=role)
    assert first[0] == expected_status, first[1]
    assert "Idempotent-Replayed" not in first[2]
    assert second[0] == first[0]
    assert second[1] == first[1]
    assert second[2]["Idempotent-Replayed"] == "true"
    assert second[2]["Content-Type"].startswith("application/json")
    assert second[2].get("Location") == first[2].get("Location")
    assert await count(db, table) == 1


async def test_same_key_different_body_is_422(api: Api, db: asyncpg.Connection) -> None:
    status, _, _ = await send(api, "key-1", in_app(message="one"))
    assert status == 202
    status, body, headers = await send(api, "key-1", in_app(message="two"))
    assert status == 422, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert body["type"].endswith("idempotency-key-reused")
    assert await count(db, "notifications") == 1


async def test_same_key_on_another_route_is_422(api: Api) -> None:
    status, _, _ = await send(api, "key-1", in_app())
    assert status == 202
    status, body, _ = await send(api, "key-1", in_app(), "/api/notifications/send/")
    assert status == 422, body


async def test_key_is_scoped_to_caller_and_tenant(api: Api, db: asyncpg.Connection) -> None:
    body = in_app()
    answers = [
        await send(api, "shared", body, user="svc-1"),
        await send(api, "shared", body, user="svc-2"),
        await send(api, "shared", body, user="svc-1", tenant="TEN-0002"),
    ]
    assert [a[0] for a in answers] == [202, 202, 202]
    assert all("Idempotent-Replayed" not in a[2] for a in answers)
    assert len({a[1]["notification_id"] for a in answers}) == 3
    assert await count(db, "notifications") == 3


async def test_concurrent_duplicates_run_once(api: Api, db: asyncpg.Connection) -> None:
    body = in_app()
    answers = await asyncio.gather(*(send(api, "burst", body) for _ in range(10)))
    statuses = [a[0] for a in answers]
    assert set(statuses) <= {202, 409}, statuses
    accepted = {a[1]["notification_id"] for a in answers if a[0] == 202}
    assert len(accepted) == 1, answers
    for status, problem, headers in answers:
        if status == 409:
            assert headers["Content-Type"].startswith(PROBLEM_JSON)
            assert problem["type"].endswith("idempotency-in-progress")
    assert await count(db, "notifications") == 1
    # once the first has finished, every retry is a replay of it
    status, replay, headers = await send(api, "burst", body)
    assert (status, replay["notification_id"]) == (202, accepted.pop())
    assert headers["Idempotent-Replayed"] == "true"


async def test_in_flight_claim_answers_409(api: Api, db: asyncpg.Connection) -> None:
    """A claim without a response, younger than the stale bound, is a request still running."""
    body = in_app()
    status, _, _ = await send(api, "probe", body)
    assert status == 202
    fingerprint = await db.fetchval("SELECT request_hash FROM idempotency_keys WHERE key = 'probe'")
    await db.execute(
        "INSERT INTO idempotency_keys (tenant_id, user_id, key, request_hash) "
        "VALUES ($1, $2, 'running', $3)",
        TENANT,
        SERVICE,
        fingerprint,
    )
    status, problem, headers = await send(api, "running", body)
    assert status == 409, problem
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert headers["Retry-After"] == "1"
    assert await count(db, "notifications") == 1


async def test_failed_validation_does_not_burn_the_key(api: Api, db: asyncpg.Connection) -> None:
    bad = {"notification_type": "in_app", "recipient": "auth0|42"}  # no message
    for _ in range(2):
        status, problem, _ = await send(api, "retry-me", bad)
        assert status == 422, problem
        assert problem["type"].endswith("validation")
        assert {e["field"] for e in problem["errors"]} == {"message"}
    assert await count(db, "idempotency_keys") == 0
    status, body, headers = await send(api, "retry-me", in_app())
    assert status == 202, body
    assert "Idempotent-Replayed" not in headers
    assert await count(db, "notifications") == 1


async def test_forbidden_request_does_not_burn_the_key(api: Api, db: asyncpg.Connection) -> None:
    email = {"notification_type": "email", "recipient": "a@example.com", "message": "hi"}
    status, problem, _ = await send(api, "k", email, role="user")
    assert status == 403, problem
    assert await count(db, "idempotency_keys") == 0


@pytest.mark.parametrize("key", ["k" * 256, "has space", "naïve"])
async def test_bad_key_is_400(api: Api, db: asyncpg.Connection, key: str) -> None:
    status, problem, headers = await api.post(
        "/notifications/send/",
        in_app(),
        user=SERVICE,
        role="service",
        headers={"Idempotency-Key": key.encode().decode("latin-1")},
    )
    assert status == 400, problem
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert "Idempotency-Key" in problem["detail"]
    assert await count(db, "notifications") == 0


async def test_key_of_255_characters_is_accepted(api: Api) -> None:
    status, body, _ = await send(api, "k" * 255, in_app())
    assert status == 202, body


async def test_stale_in_flight_claim_is_taken_over(api: Api, db: asyncpg.Connection) -> None:
    """A claim left by a crashed request (no response after the stale bound) does not block."""
    await db.execute(
        "INSERT INTO idempotency_keys (tenant_id, user_id, key, request_hash, created_at) "
        "VALUES ($1, $2, $3, $4, now() - interval '2 minutes')",
        TENANT,
        SERVICE,
        "crashed",
        b"some other request",
    )
    status, body, headers = await send(api, "crashed", in_app())
    assert status == 202, body
    assert "Idempotent-Replayed" not in headers
    row = await db.fetchrow(
        "SELECT status_code, completed_at, created_at > now() - interval '1 minute' AS fresh "
        "FROM idempotency_keys WHERE key = 'crashed'"
    )
    assert row["status_code"] == 202
    assert row["completed_at"] is not None
    assert row["fresh"]
    status, replay, headers = await send(api, "crashed", in_app())
    assert (status, replay) == (202, body)
    assert headers["Idempotent-Replayed"] == "true"
    assert await count(db, "notifications") == 1


async def test_housekeeper_purges_expired_keys_and_replay_runs_anew(
    api: Api, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    ttl = api.daemon.settings.idempotency_ttl
    status, first, _ = await send(api, "old", in_app())
    assert status == 202
    status, _, _ = await send(api, "young", in_app())
    assert status == 202
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => $1 + 60) "
        "WHERE key = 'old'",
        ttl,
    )
    removed = await Housekeeper(pool, ttl=ttl, interval=3600).sweep_once()
    assert removed == 1
    keys = await db.fetch("SELECT key FROM idempotency_keys")
    assert [r["key"] for r in keys] == ["young"]

    status, second, headers = await send(api, "old", in_app())
    assert status == 202, second
    assert "Idempotent-Replayed" not in headers
    assert second["notification_id"] != first["notification_id"]
    assert await count(db, "notifications") == 3


async def test_expired_key_not_yet_purged_runs_anew(api: Api, db: asyncpg.Connection) -> None:
    status, first, _ = await send(api, "old", in_app())
    assert status == 202
    await db.execute(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(secs => $1 + 60)",
        api.daemon.settings.idempotency_ttl,
    )
    status, second, headers = await send(api, "old", in_app(message="a different body"))
    assert status == 202, second
    assert "Idempotent-Replayed" not in headers
    assert second["notification_id"] != first["notification_id"]
    assert await count(db, "notifications") == 2


async def test_housekeeper_sweeps_in_batches(db: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    await db.executemany(
        "INSERT INTO idempotency_keys (tenant_id, user_id, key, request_hash, created_at) "
        "VALUES ($1, 'u', $2, '\\x00', now() - interval '2 days')",
        [(TENANT, f"k{i}") for i in range(7)],
    )
    removed = await Housekeeper(pool, ttl=86_400, interval=3600, batch=3).sweep_once()
    assert removed == 7
    assert await count(db, "idempotency_keys") == 0


async def test_housekeeper_forgets_event_ids_past_their_dedupe_lifetime(
    db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """Ingested event ids are kept for NOTIFYD_EVENT_DEDUPE_TTL, then forgotten in batches;
    younger ones stay, so their replays are still recognised."""
    for n in range(7):
        await db.execute(
            "INSERT INTO ingested_events (tenant_id, event_id, event_type, source, received_at) "
            "VALUES ('TEN-0001', $1, 'x', 'redis', now() - make_interval(days => $2))",
            f"evt-{n}",
            40 if n < 5 else 1,
        )
    keeper = Housekeeper(pool, ttl=86_400, interval=3600, batch=2, event_ttl=30 * 86_400)
    assert await keeper.forget_old_events() == 5
    kept = await db.fetch("SELECT event_id FROM ingested_events ORDER BY event_id")
    assert [r["event_id"] for r in kept] == ["evt-5", "evt-6"]
    assert await Housekeeper(pool, ttl=86_400, interval=3600).forget_old_events() == 0
