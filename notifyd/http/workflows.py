"""Workflows: definitions (admin), triggers and cancels (service, admin), runs.

A trigger commits every run and step row (the truth) with its audit row and idempotency
record, then puts each pending step on the timer wheel; if Redis fails there, the sweeper
puts them back from PostgreSQL. A cancel is one guarded UPDATE that waits for a step being
fired (its row lock): its 200 means no step it counted is sent afterwards, and no step
it did not count is pending any more.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from notifyd.auth import policy
from notifyd.http.context import audit_entry, identity, services
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.problems import FieldError, Problem, forbidden, invalid, not_found
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import parse_uuid
from notifyd.schemas.workflows import PATTERN_MESSAGES, RUNS, WORKFLOW_KEY_PATTERN
from notifyd.store import audit
from notifyd.store import workflows as store
from notifyd.workflows import put_on_wheel, start_runs, wheel_item

log = logging.getLogger("notifyd.http.workflows")

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
    async with ctx.pool.acquire() as conn, conn.transaction():
        started = await start_runs(
            conn,
            tenant_id=caller.tenant_id,
            key=key,
            stored=found["definition"],
            trigger=body,
            created_by=caller.user_id,
            digest_max_items=ctx.settings.workflow_digest_max_items,
        )
        await audit.record(
            conn, audit_entry(request, "workflow.trigger", started.audit_details(key, body))
        )
        response = await remember(request, conn, json_response(started.answer(), status=202))
    await put_on_wheel(ctx.schedule, ctx.keys, started)
    return response


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
