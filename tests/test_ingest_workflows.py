"""Ingested events that name a `workflow` (issue 27): the Redis stream and RabbitMQ, real
daemons, PostgreSQL, Redis and broker.

Promises checked (each test names its own): an event naming a workflow starts one run per
recipient, as `POST /workflows/{key}/trigger/` does (audited `workflow.trigger` with the
event's source), and its steps fire; published three times it starts them once (the
(tenant, event id) deduplication); a trigger field the REST body would refuse, an unknown
field, or a workflow the tenant does not have is dead-lettered with a reason naming the
field, nothing stored, and the stream keeps flowing; the source's tenant binding and its
`critical` rule apply as to any event; the same holds through RabbitMQ.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.ids import OpaqueIdRule
from notifyd.ingest.events import EventLimits, MalformedEvent, WorkflowEvent, parse_event
from notifyd.schemas.registry import Schemas
from notifyd.settings import DEFAULT_ID_PATTERN
from tests.conftest import DaemonFactory
from tests.helpers import Api, make_settings, wait_for
from tests.rabbitmq_server import RabbitMqServer
from tests.smtp_sink import SmtpSink
from tests.test_ingest_rabbitmq import (  # noqa: F401 (the session's broker fixture)
    consuming,
    delivered_all,
    queue,
    rabbitmq,
    start_with_broker,
)
from tests.test_ingest_rabbitmq import publish as publish_amqp
from tests.test_ingest_redis import TENANT_A, TENANT_B, consumed, dead_letters, publish, start

WORKFLOW = "interview"
DEFINITION = {
    "category": "interviews",
    "steps": [{"channel": "in_app", "template_key": "interviewScheduling"}],
}
TEMPLATE = {"text_body": "Interview for {{ position }}"}


def workflow_event(
    event_id: str = "wf-1", tenant_id: str = TENANT_A, **fields: Any
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "type": "interview.scheduled",
        "workflow": WORKFLOW,
        "recipients": ["cand-1", "cand-2"],
        "data": {"position": "Engineer"},
        "cancel_key": "application-7",
        **fields,
    }


async def put_workflow(daemon: Any, tenant: str = TENANT_A) -> None:
    async with Api(daemon) as api:
        status, body, _ = await api.request(
            "PUT",
            "/templates/interviewScheduling/in_app/",
            json=TEMPLATE,
            tenant=tenant,
            user="admin-1",
            role="admin",
        )
        assert status == 200, body
        status, body, _ = await api.request(
            "PUT",
            f"/workflows/{WORKFLOW}/",
            json=DEFINITION,
            tenant=tenant,
            user="admin-1",
            role="admin",
        )
        assert status == 200, body


async def runs_done(
    db: asyncpg.Connection, count: int, timeout: float = 15
) -> list[asyncpg.Record]:
    """`count` runs exist and none of their steps is pending any more."""

    async def done() -> bool:
        runs = await db.fetchval("SELECT count(*) FROM workflow_runs")
        pending = await db.fetchval("SELECT count(*) FROM workflow_steps WHERE status = 'pending'")
        return runs == count and pending == 0

    await wait_for(done, timeout=timeout)
    return list(
        await db.fetch(
            "SELECT r.tenant_id, r.recipient, r.cancel_key, r.created_by, s.status "
            "FROM workflow_runs r JOIN workflow_steps s ON s.run_id = r.id ORDER BY r.recipient"
        )
    )


# --- the schema, without a daemon --------------------------------------------------------

SETTINGS = make_settings("postgresql://x/y", "redis://x")
LIMITS = EventLimits(
    max_bytes=4096,
    max_recipients=3,
    context_max_keys=5,
    id_rule=OpaqueIdRule.from_settings(128, DEFAULT_ID_PATTERN),
    trigger=Schemas.build(SETTINGS).workflow_trigger,
)


def test_an_event_naming_a_workflow_is_read_by_the_trigger_apis_own_model() -> None:
    """One source for the trigger's rules: the event's trigger fields are the REST body's,
    read by `Schemas.workflow_trigger` (its bounds and rules included)."""
    parsed = parse_event(orjson.dumps(workflow_event(critical=True)), LIMITS)
    assert isinstance(parsed, WorkflowEvent)
    assert (parsed.tenant_id, parsed.workflow_key, parsed.critical) == (TENANT_A, WORKFLOW, True)
    assert parsed.trigger.recipients == ["cand-1", "cand-2"]
    assert parsed.trigger.cancel_key == "application-7"
    assert parsed.trigger.data == {"position": "Engineer"}

    with pytest.raises(MalformedEvent) as caught:
        parse_event(
            orjson.dumps(
                workflow_event(
                    recipients=["cand-1", "cand-1"],
                    data={"a\u0000": 1},
                    template_key="x",
                    workflow="bad key!",
                )
            ),
            LIMITS,
        )
    reason = str(caught.value)
    for field in (
        "recipients[1]: appears twice",
        "data: must not contain NUL",
        "template_key: is not a known field",
        "workflow: must be",
    ):
        assert field in reason, (field, reason)
    with pytest.raises(MalformedEvent) as caught:
        parse_event(orjson.dumps(workflow_event(recipients=[])), LIMITS)
    assert "recipients" in str(caught.value)


# --- through the daemon -----------------------------------------------------------------


async def test_an_event_naming_a_workflow_starts_its_runs_once_and_the_steps_fire(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: an event naming a workflow triggers it as the REST API does (one run per
    recipient, audited with the event's source), its steps fire, and published three times
    it starts them once."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_workflow(daemon)
    await publish(redis, workflow_event())
    await publish(redis, workflow_event())
    await consumed(redis)
    await publish(redis, workflow_event())
    await consumed(redis)
    steps = await runs_done(db, 2)
    assert [(s["recipient"], s["status"]) for s in steps] == [
        ("cand-1", "sent"),
        ("cand-2", "sent"),
    ]
    assert {s["cancel_key"] for s in steps} == {"application-7"}
    assert {s["created_by"] for s in steps} == {"event:interview.scheduled"}
    made = await db.fetch("SELECT user_id, body FROM notifications ORDER BY user_id")
    assert [(m["user_id"], m["body"]) for m in made] == [
        ("cand-1", "Interview for Engineer"),
        ("cand-2", "Interview for Engineer"),
    ]
    audits = await db.fetch(
        "SELECT details->>'via' AS via, details->>'source' AS source, "
        "details->>'event_id' AS event_id FROM audit_log WHERE action = 'workflow.trigger'"
    )
    assert [tuple(a) for a in audits] == [("ingest", "redis", "wf-1")]
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == 1
    assert int(await redis.xlen("notifyd:dead")) == 0


async def test_a_workflow_event_refused_is_dead_lettered_naming_the_field_and_nothing_stored(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: a trigger the REST API would refuse, a workflow the tenant does not
    have, a tenant beyond the stream's binding or `critical` where it is not allowed goes to
    the dead-letter stream with a reason naming the field; nothing is stored for it; the
    good event behind them starts its runs."""
    daemon = await start(
        daemon_factory,
        smtp_sink,
        NOTIFYD_EVENTS_TENANTS=TENANT_A,
        NOTIFYD_EVENTS_ALLOW_CRITICAL="false",
    )
    await put_workflow(daemon)
    await put_workflow(daemon, TENANT_B)
    bad: list[tuple[dict[str, Any], str]] = [
        (workflow_event("e1", recipients=["cand-1", "cand-1"]), "recipients[1]: appears twice"),
        (workflow_event("e2", workflow="no-such-workflow"), "workflow: the tenant has no"),
        (workflow_event("e3", send_at="2026-01-01T00:00:00"), "send_at:"),
        (workflow_event("e4", channels=["email"]), "channels: is not a known field"),
        (workflow_event("e5", TENANT_B), "tenant_id: the redis source may not publish"),
        (workflow_event("e6", critical=True), "critical: the redis source may not send"),
    ]
    for body, _ in bad:
        await publish(redis, body)
    await publish(redis, workflow_event("good"))
    letters = await dead_letters(redis, len(bad))
    reason_of = {letter["f:event"].encode(): letter["reason"] for letter in letters}
    for body, expected in bad:
        assert expected in reason_of[orjson.dumps(body)], (expected, reason_of)
    await consumed(redis)
    steps = await runs_done(db, 2)
    assert {s["tenant_id"] for s in steps} == {TENANT_A}
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["good"]


async def test_a_rabbitmq_message_naming_a_workflow_starts_its_runs_once(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,  # noqa: F811
    queue: str,  # noqa: F811
) -> None:
    """The promise, through RabbitMQ: a message naming a workflow, published three times,
    starts one run per recipient once; one naming a workflow the tenant lacks is
    dead-lettered with the reason."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await consuming(daemon)
    await put_workflow(daemon)
    missing = workflow_event("wf-missing", workflow="nope")
    await publish_amqp(
        rabbitmq, queue, workflow_event(), workflow_event(), missing, workflow_event()
    )
    steps = await runs_done(db, 2)
    assert [s["status"] for s in steps] == ["sent", "sent"]
    await delivered_all(rabbitmq, queue)
    (letter,) = await dead_letters(redis, 1)
    assert "workflow: the tenant has no" in letter["reason"]
    source = await db.fetchval("SELECT source FROM ingested_events WHERE event_id = 'wf-1'")
    assert source == "rabbitmq"
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == 1
