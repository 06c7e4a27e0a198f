"""Workflow definitions, triggers, cancels and runs over REST (issue 27).

Promises checked: an admin defines a workflow (the issue's JSON, digest, throttle and quiet
hours included) and reads it back; services read but never write definitions; every bound
is a 422 naming the field (steps count, durations, unless, times of day, unknown fields) and
stores nothing; a trigger answers 202 with one run per recipient, each step a row due at the
trigger (or send_at) plus its delay, critical_only steps of a non-critical trigger skipped
at once; the same Idempotency-Key makes the runs once; a cancel counts the runs it stopped;
tenant B cannot see, trigger or cancel tenant A's workflows and runs; a user sees only the
runs addressed to them; every change is audited.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from notifyd.store import workflows as workflow_store
from tests.helpers import Api

TENANT = "TEN-0001"
OTHER_TENANT = "TEN-0002"
ADMIN = "ops-admin"
SERVICE = "hiring-backend"

ISSUE_WORKFLOW: dict[str, Any] = {
    "category": "interviews",
    "steps": [
        {"channel": "in_app", "template_key": "interviewScheduling"},
        {
            "channel": "email",
            "template_key": "interviewScheduling",
            "delay": "15m",
            "unless": ["read", "online"],
        },
        {
            "channel": "sms",
            "template_key": "interviewScheduling",
            "delay": "2h",
            "unless": ["read"],
            "critical_only": True,
        },
    ],
    "digest": {"window": "1h", "key": "application_id"},
    "throttle": {"limit": 3, "per": "1h"},
    "quiet_hours": {"start": "21:00", "end": "08:00"},
}


async def define(
    api: Api, key: str, body: dict[str, Any], *, tenant: str = TENANT, role: str = "admin"
) -> tuple[int, Any]:
    status, answer, _ = await api.request(
        "PUT", f"/workflows/{key}/", json=body, tenant=tenant, user=ADMIN, role=role
    )
    return status, answer


async def trigger(
    api: Api, key: str, body: dict[str, Any], *, tenant: str = TENANT, **kw: Any
) -> tuple[int, Any]:
    status, answer, _ = await api.post(
        f"/workflows/{key}/trigger/", body, tenant=tenant, user=SERVICE, role="service", **kw
    )
    return status, answer


def fields(answer: dict[str, Any]) -> dict[str, str]:
    return {e["field"]: e["message"] for e in answer["errors"]}


async def test_admin_defines_the_issues_workflow_and_reads_it_back(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await define(api, "interview", ISSUE_WORKFLOW)
    assert status == 200, answer
    assert answer["workflow_key"] == "interview"
    assert answer["steps"][1]["unless"] == ["read", "online"]
    assert answer["digest"] == {"window": "1h", "key": "application_id"}
    assert answer["quiet_hours"] == {"start": "21:00", "end": "08:00"}
    status, listed, _ = await api.get("/workflows/", user=SERVICE, role="service")
    assert status == 200 and [w["workflow_key"] for w in listed] == ["interview"]
    status, one, _ = await api.get("/workflows/interview/", user=SERVICE, role="service")
    assert status == 200 and one == answer
    status, refused = await define(api, "interview", ISSUE_WORKFLOW, role="service")
    assert status == 403, refused
    status, refused, _ = await api.get("/workflows/", user="cand-1", role="user")
    assert status == 403, refused
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'workflow.put'") == 1

    status, _, _ = await api.request("DELETE", "/workflows/interview/", user=ADMIN, role="admin")
    assert status == 204
    status, _, _ = await api.get("/workflows/interview/", user=ADMIN, role="admin")
    assert status == 404


async def test_a_whole_number_written_as_3_0_is_the_integer_the_document_allows(api: Api) -> None:
    """JSON has one kind of number and the document says `integer`: 3.0 is 3; 3.5 and "3"
    are not integers."""
    status, answer = await define(
        api, "whole", {**ISSUE_WORKFLOW, "throttle": {"limit": 3.0, "per": "1h"}}
    )
    assert status == 200, answer
    assert answer["throttle"] == {"limit": 3, "per": "1h"}
    for limit in (3.5, "3", True):
        status, refused = await define(
            api, "whole", {**ISSUE_WORKFLOW, "throttle": {"limit": limit, "per": "1h"}}
        )
        assert status == 422 and refused["errors"][0]["field"] == "throttle.limit", refused


async def test_every_bound_is_a_422_naming_the_field_and_stores_nothing(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await define(
        api,
        "bad",
        {
            "steps": [
                {"channel": "fax", "template_key": "t"},
                {"channel": "email", "template_key": "t", "delay": "15 minutes"},
                {"channel": "email", "template_key": "t", "delay": "31d"},
                {"channel": "email", "template_key": "t", "unless": ["read", "read"]},
                {"channel": "email", "template_key": "t", "unless": ["asleep"]},
            ],
            "quiet_hours": {"start": "25:00", "end": "08:00"},
            "throttle": {"limit": 0, "per": "1h"},
            "colour": "blue",
        },
    )
    assert status == 422, answer
    found = fields(answer)
    assert set(found) == {
        "steps[0].channel",
        "steps[1].delay",
        "steps[2].delay",
        "steps[3].unless",
        "steps[4].unless[0]",
        "quiet_hours.start",
        "throttle.limit",
        "colour",
    }, found
    assert "90s, 15m, 2h or 1d" in found["steps[1].delay"]
    status, answer = await define(
        api, "bad", {"steps": [{"channel": "in_app", "template_key": "t"}] * 11}
    )
    assert status == 422 and set(fields(answer)) == {"steps"}, answer
    status, answer = await define(api, "bad", {"steps": []})
    assert status == 422 and set(fields(answer)) == {"steps"}, answer
    status, answer = await define(
        api,
        "bad",
        {
            "steps": [{"channel": "in_app", "template_key": "t"}],
            "quiet_hours": {"start": "21:00", "end": "21:00:00"},
        },
    )
    assert status == 422 and set(fields(answer)) == {"quiet_hours.end"}, answer
    # two fields' times compared: the document cannot say it, so it is a 422 of its own type
    assert answer["type"] == "urn:notifyd:problem:unsendable", answer
    status, answer = await define(
        api, "runs", {"steps": [{"channel": "in_app", "template_key": "t"}]}
    )
    assert status == 422 and set(fields(answer)) == {"workflow_key"}, answer
    assert await db.fetchval("SELECT count(*) FROM workflows") == 0


async def test_a_trigger_makes_one_run_per_recipient_with_each_step_due_after_its_delay(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await define(api, "interview", ISSUE_WORKFLOW)
    assert status == 200, answer
    send_at = datetime.now(UTC) + timedelta(hours=1)
    status, answer = await trigger(
        api,
        "interview",
        {
            "recipients": ["cand-1", "cand-2"],
            "data": {"position": "Engineer"},  # no application_id: not a digest
            "send_at": send_at.isoformat(),
            "cancel_key": "interview-app-1",
        },
    )
    assert status == 202, answer
    assert [r["recipient"] for r in answer["runs"]] == ["cand-1", "cand-2"]
    run_id = uuid.UUID(answer["runs"][0]["run_id"])
    assert run_id.version == 7
    steps = await db.fetch(
        "SELECT position, status, reason, due_at FROM workflow_steps WHERE run_id = $1 "
        "ORDER BY position",
        run_id,
    )
    assert [s["status"] for s in steps] == ["pending", "pending", "skipped"]
    assert steps[2]["reason"] == "not_critical"  # critical_only, and the trigger is not
    assert abs((steps[0]["due_at"] - send_at).total_seconds()) < 0.001
    assert abs((steps[1]["due_at"] - send_at - timedelta(minutes=15)).total_seconds()) < 0.001

    status, run, _ = await api.get(f"/workflows/runs/{run_id}/", user=SERVICE, role="service")
    assert status == 200, run
    assert run["status"] == "pending" and run["recipient"] == "cand-1"
    assert [s["status"] for s in run["steps"]] == ["pending", "pending", "skipped"]
    status, runs, _ = await api.get(
        "/workflows/runs/?recipient=cand-2", user=SERVICE, role="service"
    )
    assert status == 200 and [r["recipient"] for r in runs] == ["cand-2"]
    # a user sees the runs addressed to them, and only those
    status, mine, _ = await api.get("/workflows/runs/", user="cand-1")
    assert status == 200 and [r["run_id"] for r in mine] == [str(run_id)]
    status, _, _ = await api.get(f"/workflows/runs/{runs[0]['run_id']}/", user="cand-1")
    assert status == 404

    status, answer, _ = await api.post(
        "/workflows/interview/cancel/",
        {"cancel_key": "interview-app-1", "recipients": ["cand-1"]},
        user=SERVICE,
        role="service",
    )
    assert status == 200 and answer == {"cancelled": 1}, answer
    status, run, _ = await api.get(f"/workflows/runs/{run_id}/", user=SERVICE, role="service")
    assert run["status"] == "cancelled"
    assert [s["status"] for s in run["steps"]] == ["cancelled", "cancelled", "skipped"]
    status, answer, _ = await api.post(
        "/workflows/interview/cancel/",
        {"cancel_key": "interview-app-1"},
        user=SERVICE,
        role="service",
    )
    assert status == 200 and answer == {"cancelled": 1}, answer  # cand-2's; cand-1's was
    actions = await db.fetch("SELECT action FROM audit_log WHERE action LIKE 'workflow.%'")
    assert sorted(a["action"] for a in actions) == [
        "workflow.cancel",
        "workflow.cancel",
        "workflow.put",
        "workflow.trigger",
    ]


async def test_trigger_input_is_bounded_and_named(api: Api, db: asyncpg.Connection) -> None:
    status, answer = await define(api, "interview", ISSUE_WORKFLOW)
    assert status == 200, answer
    status, answer = await trigger(
        api,
        "interview",
        {
            "recipients": ["cand-1", "cand-1"],
            "send_at": (datetime.now(UTC) + timedelta(days=60)).isoformat(),
            "data": "not an object",
            "critical": "yes",
        },
    )
    assert status == 422, answer
    assert set(fields(answer)) == {"data", "critical", "recipients[1]", "send_at"}, answer
    status, answer = await trigger(api, "interview", {"recipients": []})
    assert status == 422 and set(fields(answer)) == {"recipients"}, answer
    # PostgreSQL's jsonb refuses NUL anywhere: named here, not a 500 at the insert
    for data in ({"a": "x\u0000y"}, {"a\u0000": 1}, {"a": [{"b": ["\u0000"]}]}):
        status, answer = await trigger(api, "interview", {"recipients": ["c"], "data": data})
        assert status == 422 and fields(answer) == {"data": "must not contain NUL characters"}
        assert answer["type"] == "urn:notifyd:problem:unsendable", answer
    status, answer = await trigger(api, "missing", {"recipients": ["cand-1"]})
    assert status == 404, answer
    status, answer, _ = await api.post(
        "/workflows/interview/trigger/", {"recipients": ["cand-1"]}, user="cand-1"
    )
    assert status == 403, answer
    assert await db.fetchval("SELECT count(*) FROM workflow_runs") == 0


async def test_the_same_idempotency_key_makes_the_runs_once(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await define(api, "interview", ISSUE_WORKFLOW)
    assert status == 200, answer
    body = {
        "recipients": ["cand-1"],
        "send_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    headers = {"Idempotency-Key": "trigger-1"}
    first = await trigger(api, "interview", body, headers=headers)
    second = await trigger(api, "interview", body, headers=headers)
    assert first == second and first[0] == 202
    assert await db.fetchval("SELECT count(*) FROM workflow_runs") == 1


async def test_tenant_b_cannot_see_trigger_or_cancel_tenant_as_workflows_and_runs(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await define(api, "interview", ISSUE_WORKFLOW)
    assert status == 200, answer
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    status, answer = await trigger(
        api, "interview", {"recipients": ["cand-1"], "send_at": later, "cancel_key": "k"}
    )
    assert status == 202, answer
    run_id = answer["runs"][0]["run_id"]

    status, listed, _ = await api.get("/workflows/", tenant=OTHER_TENANT, user=ADMIN, role="admin")
    assert status == 200 and listed == []
    status, _, _ = await api.get(
        "/workflows/interview/", tenant=OTHER_TENANT, user=ADMIN, role="admin"
    )
    assert status == 404
    status, _ = await trigger(api, "interview", {"recipients": ["cand-1"]}, tenant=OTHER_TENANT)
    assert status == 404
    status, answer, _ = await api.post(
        "/workflows/interview/cancel/",
        {"cancel_key": "k"},
        tenant=OTHER_TENANT,
        user=SERVICE,
        role="service",
    )
    assert status == 200 and answer == {"cancelled": 0}, answer
    status, _, _ = await api.get(
        f"/workflows/runs/{run_id}/", tenant=OTHER_TENANT, user=SERVICE, role="service"
    )
    assert status == 404
    status, runs, _ = await api.get(
        "/workflows/runs/?recipient=cand-1", tenant=OTHER_TENANT, user=SERVICE, role="service"
    )
    assert status == 200 and runs == []
    status, answer = await define(api, "interview", ISSUE_WORKFLOW, tenant=OTHER_TENANT)
    assert status == 200  # the same key in another tenant is another workflow
    pending = "SELECT count(*) FROM workflow_steps WHERE status = 'pending'"
    assert await db.fetchval(pending) == 2  # tenant A's run is untouched


async def test_a_trigger_past_the_throttle_makes_a_throttled_run_that_sends_nothing(
    api: Api, db: asyncpg.Connection
) -> None:
    definition = {
        "steps": [{"channel": "in_app", "template_key": "t", "delay": "1h"}],
        "throttle": {"limit": 2, "per": "1h"},
    }
    status, answer = await define(api, "digestless", definition)
    assert status == 200, answer
    statuses = []
    for _ in range(3):
        status, answer = await trigger(api, "digestless", {"recipients": ["cand-1"]})
        assert status == 202, answer
        run_id = answer["runs"][0]["run_id"]
        _, run, _ = await api.get(f"/workflows/runs/{run_id}/", user=SERVICE, role="service")
        statuses.append((run["status"], [(s["status"], s["reason"]) for s in run["steps"]]))
    assert statuses == [
        ("pending", [("pending", None)]),
        ("pending", [("pending", None)]),
        ("throttled", [("throttled", "throttle")]),
    ]
    # another recipient has a window of their own; concurrent triggers still count each
    results = await asyncio.gather(
        *(trigger(api, "digestless", {"recipients": ["cand-2"]}) for _ in range(6))
    )
    assert all(status == 202 for status, _ in results)
    active = await db.fetchval(
        "SELECT count(*) FROM workflow_runs WHERE recipient = 'cand-2' AND status = 'active'"
    )
    assert active == 2
    pending = "SELECT count(*) FROM workflow_steps WHERE status = 'pending'"
    assert await db.fetchval(pending) == 4


async def test_two_triggers_for_one_recipient_count_their_throttle_one_after_the_other(
    database_url: str,
) -> None:
    """The second trigger's count waits for the first to commit, then sees its run."""
    first, second = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        one, two = first.transaction(), second.transaction()
        await one.start()
        assert await workflow_store.recent_runs(first, TENANT, "w", ["cand-1"], 3600) == {}
        await first.execute(
            "INSERT INTO workflow_runs (id, tenant_id, workflow_key, recipient, definition, "
            "created_by, starts_at) VALUES ($1, $2, 'w', 'cand-1', '{}', 'svc', now())",
            uuid.uuid4(),
            TENANT,
        )
        await two.start()
        counting = asyncio.ensure_future(
            workflow_store.recent_runs(second, TENANT, "w", ["cand-1"], 3600)
        )
        done, _ = await asyncio.wait({counting}, timeout=0.5)
        assert not done, "the second count must wait for the first trigger's commit"
        await one.commit()
        assert await counting == {"cand-1": 1}
        await two.commit()
    finally:
        await first.close()
        await second.close()
