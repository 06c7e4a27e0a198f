"""Workflows: definitions (admin), triggers and cancels (service, admin), runs.

A trigger commits every run and step row (the truth) with its audit row and idempotency
record, then puts each pending step on the timer wheel; if Redis fails there, the sweeper
puts them back from PostgreSQL. A cancel is one guarded UPDATE that waits for a step being
fired (its row lock): its 200 means no step it counted is sent afterwards, and no step
it did not count is pending any more.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from notifyd.auth import policy
from notifyd.http.context import Services, audit_entry, identity, services
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.problems import FieldError, Problem, forbidden, invalid, not_found
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import parse_uuid, uuid7
from notifyd.payloads import dumps
from notifyd.schemas.workflows import (
    PATTERN_MESSAGES,
    WORKFLOW_KEY_PATTERN,
    Throttle,
    WorkflowDefinition,
    duration,
)
from notifyd.store import audit
from notifyd.store import workflows as store
from notifyd.store.pool import Conn
from notifyd.streams.schedule import Scheduled
from notifyd.workflows import plan_steps, throttled, wheel_item

log = logging.getLogger("notifyd.http.workflows")

RUNS = "runs"
"""The path segment of the runs (`/workflows/runs/`): no workflow may be called that."""

_KEY = re.compile(WORKFLOW_KEY_PATTERN)


def workflow_json(row: asyncpg.Record) -> dict[str, Any]:
    """The answer's shape (`schemas.workflows.Workflow`)."""
    return {
        "workflow_key": row["workflow_key"],
        **row["definition"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def run_status(run: asyncpg.Record, steps: list[asyncpg.Record]) -> str:
    """`pending` while a step is; else `cancelled` if a step was; else `completed`."""
    if run["status"] == "throttled":
        return "throttled"
    statuses = {step["status"] for step in steps}
    if "pending" in statuses:
        return "pending"
    return "cancelled" if "cancelled" in statuses else "completed"


def run_json(run: asyncpg.Record, steps: list[asyncpg.Record]) -> dict[str, Any]:
    """The answer's shape (`schemas.workflows.WorkflowRun`)."""
    return {
        "run_id": str(run["id"]),
        "workflow_key": run["workflow_key"],
        "recipient": run["recipient"],
        "status": run_status(run, steps),
        "cancel_key": run["cancel_key"],
        "critical": run["critical"],
        "data": run["data"],
        "created_by": run["created_by"],
        "starts_at": iso(run["starts_at"]),
        "digest": None
        if run["digest_key"] is None
        else {
            "key": run["digest_key"],
            "closes_at": iso(run["digest_closes_at"]),
            "items": run["digest_items"],
        },
        "created_at": iso(run["created_at"]),
        "updated_at": iso(run["updated_at"]),
        "steps": [
            {
                "position": step["position"],
                "channel": step["channel"],
                "template_key": step["template_key"],
                "unless": list(step["unless"]),
                "status": step["status"],
                "reason": step["reason"],
                "due_at": iso(step["due_at"]),
                "done_at": iso(step["done_at"]),
                "lateness_ms": step["lateness_ms"],
                "notification_ids": [str(i) for i in step["notification_ids"]],
            }
            for step in steps
        ],
    }


def digest_text(value: Any) -> str:
    """The digest key's value as stored: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else dumps(value).decode()


def _workflow_key(request: web.Request) -> str:
    """The path's workflow key (422 naming `workflow_key` when it cannot be one)."""
    key = request.match_info["workflow_key"]
    if not _KEY.fullmatch(key):
        raise invalid([FieldError("workflow_key", str(PATTERN_MESSAGES[WORKFLOW_KEY_PATTERN]))])
    if key == RUNS:
        raise invalid([FieldError("workflow_key", f"{RUNS} names the runs: choose another key")])
    return key


# ---------------------------------------------------------------- definitions


async def put_workflow(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    key = _workflow_key(request)
    body = await read_model(request, schemas(request).workflow)
    if not policy.may_write_workflows(caller):
        raise forbidden("only an admin may define workflows")
    definition = body.model_dump(mode="json", exclude_none=True)
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.put(
            conn, caller.tenant_id, key, definition, ctx.settings.workflows_per_tenant
        )
        if row is None:
            raise Problem(
                409,
                f"the tenant has {ctx.settings.workflows_per_tenant} workflows already "
                "(NOTIFYD_WORKFLOWS_PER_TENANT); delete one first",
                kind="too-many-workflows",
            )
        await audit.record(
            conn, audit_entry(request, "workflow.put", {"workflow_key": key, **definition})
        )
    return json_response(workflow_json(row))


async def get_workflow(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    key = _workflow_key(request)
    if not policy.may_read_workflows(caller):
        raise forbidden(f"role {caller.role!r} may not read workflows")
    row = await store.get(ctx.pool, caller.tenant_id, key)
    if row is None:
        raise not_found("workflow")
    return json_response(workflow_json(row))


async def list_workflows(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    if not policy.may_read_workflows(caller):
        raise forbidden(f"role {caller.role!r} may not read workflows")
    rows = await store.list_all(ctx.pool, caller.tenant_id, ctx.settings.workflows_per_tenant)
    return json_response([workflow_json(row) for row in rows])


async def delete_workflow(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    key = _workflow_key(request)
    if not policy.may_write_workflows(caller):
        raise forbidden("only an admin may delete workflows")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.delete(conn, caller.tenant_id, key):
            raise not_found("workflow")
        await audit.record(conn, audit_entry(request, "workflow.delete", {"workflow_key": key}))
    return web.Response(status=204)


# ---------------------------------------------------------------- triggers and cancels


async def _put_on_wheel(ctx: Services, items: list[tuple[Scheduled, datetime]]) -> None:
    """After the commit: the rows are the truth; if Redis fails here, the sweeper's rebuild
    and overdue check put the steps on the wheel from PostgreSQL."""
    try:
        await ctx.schedule.add_many(items)
    except RedisError as exc:
        log.warning("steps not put on the wheel; left for the sweeper", extra={"error": repr(exc)})


async def trigger_workflow(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    key = _workflow_key(request)
    body = await read_model(request, schemas(request).workflow_trigger)
    if not policy.may_trigger_workflows(caller):
        raise forbidden(f"role {caller.role!r} may not trigger workflows; use a service token")
    await check_send_rate(request)
    found = await store.get(ctx.pool, caller.tenant_id, key)
    if found is None:
        raise not_found("workflow")
    definition = WorkflowDefinition.model_validate(found["definition"])
    starts_at = body.send_at or datetime.now(UTC)
    digest = definition.digest
    digest_value = None if digest is None else body.data.get(digest.key)
    # a digest run takes triggers until its window closes; its steps start then
    closes_at = None
    if digest is not None and digest_value is not None:
        closes_at = starts_at + duration(digest.window)
    runs = [
        store.NewRun(
            id=uuid7(),
            tenant_id=caller.tenant_id,
            workflow_key=key,
            recipient=recipient,
            definition=found["definition"],
            data=body.data,
            critical=body.critical,
            cancel_key=body.cancel_key,
            created_by=caller.user_id,
            starts_at=starts_at,
            steps=plan_steps(definition, closes_at or starts_at, critical=body.critical),
            digest_key=None if closes_at is None else digest_text(digest_value),
            digest_closes_at=closes_at,
        )
        for recipient in body.recipients
    ]
    async with ctx.pool.acquire() as conn, conn.transaction():
        joined: dict[str, uuid.UUID] = {}
        if closes_at is not None:
            await store.lock_recipients(conn, caller.tenant_id, key, body.recipients)
            joined = await store.join_digests(
                conn,
                caller.tenant_id,
                key,
                body.recipients,
                digest_text(digest_value),
                body.data,
                ctx.settings.workflow_digest_max_items,
            )
            runs = [run for run in runs if run.recipient not in joined]
        if definition.throttle is not None:
            runs = await _throttle(conn, caller.tenant_id, key, definition.throttle, runs)
        await store.insert_runs(conn, runs)
        started = {run.recipient: run.id for run in runs} | joined
        answer = {"runs": [{"run_id": str(started[r]), "recipient": r} for r in body.recipients]}
        await audit.record(
            conn,
            audit_entry(
                request,
                "workflow.trigger",
                {
                    "workflow_key": key,
                    "run_ids": [str(started[r]) for r in body.recipients],
                    "merged": len(joined),
                    "cancel_key": body.cancel_key,
                    "critical": body.critical,
                },
            ),
        )
        response = await remember(request, conn, json_response(answer, status=202))
    await _put_on_wheel(
        ctx,
        [
            (wheel_item(ctx.keys, caller.tenant_id, run.id, step.position), step.due_at)
            for run in runs
            for step in run.steps
            if step.status == "pending"
        ],
    )
    return response


async def _throttle(
    conn: Conn, tenant_id: str, key: str, throttle: Throttle, runs: list[store.NewRun]
) -> list[store.NewRun]:
    """`runs` with those past the throttle marked `throttled` (their steps too): at most
    `limit` runs per recipient and workflow within `per`, counting these in order."""
    window = duration(throttle.per).total_seconds()
    counts = await store.recent_runs(conn, tenant_id, key, [r.recipient for r in runs], window)
    decided = []
    for run in runs:
        seen = counts.get(run.recipient, 0)
        if seen >= throttle.limit:
            run = dataclasses.replace(run, status="throttled", steps=throttled(run.steps))
        else:
            counts[run.recipient] = seen + 1
        decided.append(run)
    return decided


async def cancel_workflow(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    key = _workflow_key(request)
    body = await read_model(request, schemas(request).workflow_cancel)
    if not policy.may_trigger_workflows(caller):
        raise forbidden(f"role {caller.role!r} may not cancel workflows; use a service token")
    async with ctx.pool.acquire() as conn, conn.transaction():
        cancelled = await store.cancel(
            conn, caller.tenant_id, key, body.cancel_key, body.recipients
        )
        runs = {row["run_id"] for row in cancelled}
        await audit.record(
            conn,
            audit_entry(
                request,
                "workflow.cancel",
                {
                    "workflow_key": key,
                    "cancel_key": body.cancel_key,
                    "recipients": body.recipients,
                    "run_ids": sorted(str(run_id) for run_id in runs),
                },
            ),
        )
        response = await remember(request, conn, json_response({"cancelled": len(runs)}))
    try:  # a leftover entry finds its step cancelled and is dropped
        for row in cancelled:
            await ctx.schedule.remove(
                wheel_item(ctx.keys, caller.tenant_id, row["run_id"], row["position"])
            )
    except RedisError as exc:
        log.warning("cancelled steps left on the wheel", extra={"error": repr(exc)})
    return response


# ---------------------------------------------------------------- runs


async def get_run(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    run_id = parse_uuid(request.match_info["run_id"])
    run = None if run_id is None else await store.get_run(ctx.pool, caller.tenant_id, run_id)
    if run is None or not policy.may_view_workflow_run(caller, run["recipient"]):
        raise not_found("workflow run")
    steps = await store.steps_of(ctx.pool, caller.tenant_id, [run["id"]])
    return json_response(run_json(run, steps[run["id"]]))


async def list_runs(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).run_query)
    recipient = query.recipient
    if policy.only_own(caller) is not None:
        if recipient not in (None, caller.user_id):
            raise forbidden("a user sees only the runs addressed to them")
        recipient = caller.user_id
    rows = await store.list_runs(
        ctx.pool,
        caller.tenant_id,
        recipient=recipient,
        workflow_key=query.workflow_key,
        before=query.before,
        limit=query.limit + 1,
    )
    rows, headers = page(request, rows, query.limit)
    steps: dict[uuid.UUID, list[asyncpg.Record]] = await store.steps_of(
        ctx.pool, caller.tenant_id, [row["id"] for row in rows]
    )
    return json_response([run_json(row, steps[row["id"]]) for row in rows], headers=headers)


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        # the runs first: static resources, matched before `{workflow_key}`
        app.router.add_get(f"{prefix}/workflows/{RUNS}/", list_runs)
        app.router.add_get(f"{prefix}/workflows/{RUNS}/{{run_id}}/", get_run)
        app.router.add_get(f"{prefix}/workflows/", list_workflows)
        app.router.add_put(f"{prefix}/workflows/{{workflow_key}}/", put_workflow)
        app.router.add_get(f"{prefix}/workflows/{{workflow_key}}/", get_workflow)
        app.router.add_delete(f"{prefix}/workflows/{{workflow_key}}/", delete_workflow)
        app.router.add_post(f"{prefix}/workflows/{{workflow_key}}/trigger/", trigger_workflow)
        app.router.add_post(f"{prefix}/workflows/{{workflow_key}}/cancel/", cancel_workflow)
