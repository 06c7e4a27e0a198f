"""Interview reminders over REST: create, list, fetch, reschedule, cancel, and who may do what.

Promises checked: a service creates reminders (201, UUIDv7 id, Location); bad input is a 422
naming the field and stores nothing; the candidate, the employer and the creator see a
reminder, an unrelated user of the same tenant does not; reschedule and cancel change the row
in PostgreSQL, only while it is still scheduled (409 after), and only for the creator, the
employer or a service; every write leaves an audit row.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tests.helpers import Api

TENANT = "TEN-0001"
SERVICE = "hiring-backend"
CANDIDATE = "cand-1"
EMPLOYER = "auth0|emp-1"
PROBLEM_JSON = "application/problem+json"


def _at(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def reminder_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "application_id": "app-1",
        "candidate_id": CANDIDATE,
        "employer_id": EMPLOYER,
        "interview_time": _at(48),
        "reminder_time": _at(24),
    }
    body.update(overrides)
    return body


async def create(api: Api, tenant: str = TENANT, **overrides: Any) -> dict[str, Any]:
    status, body, _ = await api.post(
        "/reminders/create/",
        reminder_body(**overrides),
        tenant=tenant,
        user=SERVICE,
        role="service",
    )
    assert status == 201, body
    return body


def field_names(body: dict[str, Any]) -> set[str]:
    return {error["field"] for error in body["errors"]}


async def test_service_creates_reminder_with_uuid7_id_and_location(
    api: Api, db: asyncpg.Connection
) -> None:
    status, body, headers = await api.post(
        "/reminders/create/", reminder_body(), user=SERVICE, role="service"
    )
    assert status == 201, body
    reminder_id = uuid.UUID(body["reminder_id"])
    assert reminder_id.version == 7
    assert headers["Location"] == f"/reminders/{reminder_id}/"
    row = await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", reminder_id)
    assert row is not None
    assert row["tenant_id"] == TENANT
    assert row["status"] == "scheduled"
    assert (row["candidate_id"], row["employer_id"], row["created_by"]) == (
        CANDIDATE,
        EMPLOYER,
        SERVICE,
    )


async def test_user_token_may_not_create_reminder(api: Api, db: asyncpg.Connection) -> None:
    status, body, headers = await api.post("/reminders/create/", reminder_body(), user=EMPLOYER)
    assert status == 403, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert await db.fetchval("SELECT count(*) FROM interview_reminders") == 0


async def test_missing_fields_each_named(api: Api, db: asyncpg.Connection) -> None:
    status, body, headers = await api.post("/reminders/create/", {}, user=SERVICE, role="service")
    assert status == 422, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert field_names(body) == {
        "application_id",
        "candidate_id",
        "employer_id",
        "interview_time",
        "reminder_time",
    }
    assert await db.fetchval("SELECT count(*) FROM interview_reminders") == 0


async def test_times_without_offset_are_rejected(api: Api) -> None:
    body = reminder_body(interview_time="2027-03-10T10:00:00", reminder_time="2027-03-10T09:00:00")
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422, problem
    assert field_names(problem) == {"interview_time", "reminder_time"}


async def test_not_a_time_is_rejected(api: Api) -> None:
    body = reminder_body(reminder_time="tomorrow morning", interview_time=12345)
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422, problem
    assert field_names(problem) == {"interview_time", "reminder_time"}


async def test_reminder_time_must_be_before_interview_time(
    api: Api, db: asyncpg.Connection
) -> None:
    same = _at(30)
    for reminder_time in (_at(50), same):
        body = reminder_body(interview_time=same, reminder_time=reminder_time)
        status, problem, _ = await api.post(
            "/reminders/create/", body, user=SERVICE, role="service"
        )
        assert status == 422, problem
        assert field_names(problem) == {"reminder_time"}
    assert await db.fetchval("SELECT count(*) FROM interview_reminders") == 0


async def test_interview_in_the_past_is_rejected(api: Api) -> None:
    body = reminder_body(interview_time=_at(-1), reminder_time=_at(-2))
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422, problem
    assert "interview_time" in field_names(problem)


async def test_candidate_employer_and_creator_see_it_others_do_not(api: Api) -> None:
    created = await create(api)
    for user, role in ((CANDIDATE, "user"), (EMPLOYER, "user"), (SERVICE, "service")):
        status, listed, _ = await api.get("/reminders/", user=user, role=role)
        assert status == 200, listed
        assert [r["id"] for r in listed] == [created["reminder_id"]], user
        assert listed[0]["status"] == "scheduled"
        assert listed[0]["is_sent"] is False
    status, listed, _ = await api.get("/reminders/", user="someone-else")
    assert (status, listed) == (200, [])
    status, body, _ = await api.get(f"/reminders/{created['reminder_id']}/", user="someone-else")
    assert status == 404, body


async def test_a_service_sees_every_reminder_of_its_tenant_only(api: Api) -> None:
    first = await create(api, candidate_id="cand-a", employer_id="emp-a")
    second = await create(api, candidate_id="cand-b", employer_id="emp-b")
    await create(api, tenant="TEN-0002")
    status, listed, _ = await api.get("/reminders/", user="another-service", role="service")
    assert status == 200, listed
    assert [r["id"] for r in listed] == [second["reminder_id"], first["reminder_id"]]


async def test_list_filters_by_status_and_application(api: Api) -> None:
    kept = await create(api, application_id="app-1")
    other = await create(api, application_id="app-2")
    status, _, _ = await api.request(
        "DELETE", f"/reminders/{other['reminder_id']}/", user=SERVICE, role="service"
    )
    assert status == 204

    async def ids(query: str) -> list[str]:
        status, listed, _ = await api.get(f"/reminders/?{query}", user=EMPLOYER)
        assert status == 200, listed
        return [r["id"] for r in listed]

    assert await ids("status=scheduled") == [kept["reminder_id"]]
    assert await ids("status=cancelled") == [other["reminder_id"]]
    assert await ids("application_id=app-2") == [other["reminder_id"]]
    assert await ids("application_id=app-1&status=cancelled") == []
    status, problem, _ = await api.get("/reminders/?status=bogus", user=EMPLOYER)
    assert status == 422, problem
    assert field_names(problem) == {"status"}


async def test_get_one_reminder(api: Api) -> None:
    created = await create(api)
    status, body, _ = await api.get(f"/reminders/{created['reminder_id']}/", user=CANDIDATE)
    assert status == 200, body
    assert body["id"] == created["reminder_id"]
    assert body["application_id"] == "app-1"
    assert body["candidate_id"] == CANDIDATE
    assert body["employer_id"] == EMPLOYER
    assert body["created_by"] == SERVICE
    status, body, _ = await api.get("/reminders/not-a-uuid/", user=CANDIDATE)
    assert status == 404, body
    status, body, _ = await api.get(
        f"/reminders/{created['reminder_id']}/", tenant="TEN-0002", user=SERVICE, role="service"
    )
    assert status == 404, body


async def test_patch_reschedules_the_row(api: Api, db: asyncpg.Connection) -> None:
    created = await create(api)
    reminder_id = uuid.UUID(created["reminder_id"])
    new_reminder = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=30)
    status, body, _ = await api.request(
        "PATCH",
        f"/reminders/{reminder_id}/",
        json={"reminder_time": new_reminder.isoformat()},
        user=EMPLOYER,
    )
    assert status == 200, body
    row = await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", reminder_id)
    assert row["reminder_time"] == new_reminder
    assert row["status"] == "scheduled"

    new_interview = new_reminder + timedelta(hours=40)
    newer_reminder = new_reminder + timedelta(hours=20)
    status, body, _ = await api.request(
        "PATCH",
        f"/reminders/{reminder_id}/",
        json={
            "interview_time": new_interview.isoformat(),
            "reminder_time": newer_reminder.isoformat(),
        },
        user=SERVICE,
        role="service",
    )
    assert status == 200, body
    row = await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", reminder_id)
    assert (row["interview_time"], row["reminder_time"]) == (new_interview, newer_reminder)
    assert datetime.fromisoformat(body["interview_time"]) == new_interview


async def test_patch_with_reminder_after_interview_is_422(api: Api, db: asyncpg.Connection) -> None:
    created = await create(api)
    reminder_id = uuid.UUID(created["reminder_id"])
    before = await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", reminder_id)
    status, body, headers = await api.request(
        "PATCH", f"/reminders/{reminder_id}/", json={"reminder_time": _at(72)}, user=EMPLOYER
    )
    assert status == 422, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert field_names(body) == {"reminder_time"}
    after = await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", reminder_id)
    assert after == before


async def test_delete_cancels_and_then_changes_are_409(api: Api, db: asyncpg.Connection) -> None:
    created = await create(api)
    reminder_id = uuid.UUID(created["reminder_id"])
    status, body, _ = await api.request("DELETE", f"/reminders/{reminder_id}/", user=EMPLOYER)
    assert status == 204, body
    row = await db.fetchrow("SELECT status FROM interview_reminders WHERE id = $1", reminder_id)
    assert row["status"] == "cancelled"

    status, body, headers = await api.request(
        "PATCH", f"/reminders/{reminder_id}/", json={"reminder_time": _at(30)}, user=EMPLOYER
    )
    assert status == 409, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert body["status"] == 409
    status, body, headers = await api.request("DELETE", f"/reminders/{reminder_id}/", user=EMPLOYER)
    assert status == 409, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    row = await db.fetchrow("SELECT status FROM interview_reminders WHERE id = $1", reminder_id)
    assert row["status"] == "cancelled"


async def test_candidate_may_not_cancel_or_reschedule(api: Api, db: asyncpg.Connection) -> None:
    created = await create(api)
    reminder_id = uuid.UUID(created["reminder_id"])
    status, body, headers = await api.request(
        "DELETE", f"/reminders/{reminder_id}/", user=CANDIDATE
    )
    assert status == 403, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    status, body, _ = await api.request(
        "PATCH", f"/reminders/{reminder_id}/", json={"reminder_time": _at(30)}, user=CANDIDATE
    )
    assert status == 403, body
    row = await db.fetchrow("SELECT status FROM interview_reminders WHERE id = $1", reminder_id)
    assert row["status"] == "scheduled"


async def test_writes_leave_audit_rows(api: Api, db: asyncpg.Connection) -> None:
    created = await create(api)
    reminder_id = created["reminder_id"]
    status, _, _ = await api.request(
        "PATCH", f"/reminders/{reminder_id}/", json={"reminder_time": _at(30)}, user=EMPLOYER
    )
    assert status == 200
    status, _, _ = await api.request("DELETE", f"/reminders/{reminder_id}/", user=EMPLOYER)
    assert status == 204
    rows = await db.fetch(
        "SELECT user_id, action, details::text AS details FROM audit_log "
        "WHERE tenant_id = $1 ORDER BY id",
        TENANT,
    )
    assert [(r["user_id"], r["action"]) for r in rows] == [
        (SERVICE, "reminder.create"),
        (EMPLOYER, "reminder.reschedule"),
        (EMPLOYER, "reminder.cancel"),
    ]
    assert all(reminder_id in r["details"] for r in rows)


async def test_list_pages_with_link_header(api: Api) -> None:
    created = [(await create(api))["reminder_id"] for _ in range(3)]
    status, first, headers = await api.get("/reminders/?limit=2", user=CANDIDATE)
    assert status == 200, first
    assert [r["id"] for r in first] == created[:0:-1]
    match = re.fullmatch(r'<(.+)>; rel="next"', headers["Link"])
    assert match, headers["Link"]
    status, second, headers = await api.get(match.group(1), user=CANDIDATE)
    assert status == 200, second
    assert [r["id"] for r in second] == created[:1]
    assert "Link" not in headers


async def test_times_the_document_cannot_judge_are_unsendable_alone_and_named_with_the_rest(
    api: Api, db: asyncpg.Connection
) -> None:
    # the document allows any RFC 3339 time; "ahead of now" and "before the interview" are
    # the clock's and the other field's: a 422 of type unsendable when nothing else is wrong
    body = reminder_body(interview_time=_at(-1), reminder_time=_at(-2))
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422 and problem["type"] == "urn:notifyd:problem:unsendable", problem
    assert field_names(problem) == {"interview_time"}
    # with a fault the document does state, one 422 names both
    body["candidate_contact"] = {"timezone": "Mars/Olympus"}
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422 and problem["type"] == "urn:notifyd:problem:validation", problem
    assert field_names(problem) == {"interview_time", "candidate_contact.timezone"}
    # a phone of the right shape that is no number in the tenant's region: unsendable too
    body = reminder_body(candidate_contact={"phone": "12"})
    status, problem, _ = await api.post("/reminders/create/", body, user=SERVICE, role="service")
    assert status == 422 and problem["type"] == "urn:notifyd:problem:unsendable", problem
    assert field_names(problem) == {"candidate_contact.phone"}
    assert await db.fetchval("SELECT count(*) FROM interview_reminders") == 0


async def test_contacts_are_stored_as_the_contact_rule_reads_them(
    api: Api, db: asyncpg.Connection
) -> None:
    created = await create(
        api,
        candidate_contact={
            "email": " cand@example.com ",
            "phone": "(415) 555-2671",
            "locale": "pt_br",
            "name": " Ada ",
        },
        channels=["email", "email"],
    )
    assert created["candidate_contact"] == {
        "email": "cand@example.com",
        "phone": "+14155552671",
        "locale": "pt-BR",
        "name": "Ada",
    }
    assert created["channels"] == ["in_app", "email"]


async def test_a_reminder_answer_has_exactly_the_documented_fields(api: Api) -> None:
    created = await create(api, candidate_contact={"email": "cand@example.com"})
    status, answer, _ = await api.get(f"/reminders/{created['reminder_id']}/", user=CANDIDATE)
    assert status == 200, answer
    _, document, _ = await api.get("/openapi.json", auth=False)
    described = document["components"]["schemas"]["Reminder"]
    assert set(answer) == set(described["required"])
    assert set(created) == set(described["properties"])  # the create adds reminder_id
