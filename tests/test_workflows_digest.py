"""Digests (issue 27): triggers for one recipient, workflow and `data[key]` within the window
of the first merge into one run, whose steps start when the window closes and render once
with `items` (each trigger's data, in order) and `count`.

Promises checked: three triggers make one run and one notification listing the three, a
different key value its own run; the trigger answers name the run each joined; a trigger
after the window opens a new run; a cancel stops an open digest and the next trigger opens
a new one; triggers arriving while the window closes are each in exactly one run, rendered
there (never dropped, never doubled).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg

from notifyd.store import workflows as workflow_store
from tests.conftest import DaemonFactory
from tests.helpers import Api
from tests.test_workflows_fire import FAST, SERVICE, STEPS, USER, setup_tenant, wait_done

DIGEST_TEMPLATE = {
    "subject": "{{ count }} updates",
    "text_body": "{{ count }}:{% for item in items %} {{ item.status }}{% endfor %}",
}


def definition(window: str) -> dict[str, Any]:
    return {
        "steps": [{"channel": "in_app", "template_key": "digest"}],
        "digest": {"window": window, "key": "application_id"},
    }


async def setup_digest(api: Api, window: str) -> None:
    await setup_tenant(api, definition(window))
    status, answer, _ = await api.request(
        "PUT", "/templates/digest/in_app/", json=DIGEST_TEMPLATE, user="ops-admin", role="admin"
    )
    assert status == 200, answer


async def trigger(api: Api, application_id: str, status: str, **extra: Any) -> uuid.UUID:
    body = {
        "recipients": [USER],
        "data": {"application_id": application_id, "status": status},
        **extra,
    }
    code, answer, _ = await api.post(
        "/workflows/interview/trigger/", body, user=SERVICE, role="service"
    )
    assert code == 202, answer
    return uuid.UUID(answer["runs"][0]["run_id"])


async def body_of(db: asyncpg.Connection, run_id: uuid.UUID) -> str:
    steps = await wait_done(db, run_id, timeout=20)
    assert [s["status"] for s in steps] == ["sent"], steps
    body: str = await db.fetchval(
        "SELECT body FROM notifications WHERE id = $1", steps[0]["notification_ids"][0]
    )
    return body


async def test_three_triggers_in_the_window_are_one_run_rendered_once_with_their_items(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await setup_digest(api, "3s")
        first = await trigger(api, "app-1", "applied")
        other = await trigger(api, "app-2", "applied")
        assert await trigger(api, "app-1", "screened") == first
        assert await trigger(api, "app-1", "interview") == first
        _, run, _ = await api.get(f"/workflows/runs/{first}/", user=SERVICE, role="service")
        assert run["digest"]["items"] == 3 and run["digest"]["key"] == "app-1"
        assert run["steps"][0]["due_at"] == run["digest"]["closes_at"]
        assert await body_of(db, first) == "3: applied screened interview"
        assert await body_of(db, other) == "1: applied"
        later = await trigger(api, "app-1", "offer")  # the window closed: a new run
        assert later != first
        assert await body_of(db, later) == "1: offer"
    assert await db.fetchval("SELECT count(*) FROM notifications") == 3


async def test_a_cancel_stops_an_open_digest_and_the_next_trigger_opens_another(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await setup_digest(api, "1h")
        open_run = await trigger(api, "app-1", "applied", cancel_key="app-1")
        assert await trigger(api, "app-1", "screened", cancel_key="app-1") == open_run
        status, answer, _ = await api.post(
            "/workflows/interview/cancel/", {"cancel_key": "app-1"}, user=SERVICE, role="service"
        )
        assert status == 200 and answer == {"cancelled": 1}, answer
        assert await trigger(api, "app-1", "reopened") != open_run
    assert [s["status"] for s in await db.fetch(STEPS, open_run)] == ["cancelled"]


async def test_triggers_while_the_window_closes_are_each_in_exactly_one_rendered_run(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    total = 40
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await setup_digest(api, "1s")

        async def one(n: int) -> uuid.UUID:
            await asyncio.sleep(n * 0.06)  # spread over 2.4 s: across two or three windows
            return await trigger(api, "app-1", f"s{n}")

        run_ids = set(await asyncio.gather(*(one(n) for n in range(total))))
    assert len(run_ids) >= 2, "the triggers must straddle a window's close"
    seen: list[str] = []
    for run_id in run_ids:
        items = [
            row["status"]
            for row in await db.fetch(
                "SELECT data->>'status' AS status FROM workflow_run_items WHERE run_id = $1 "
                "ORDER BY seq",
                run_id,
            )
        ]
        rendered = await body_of(db, run_id)
        assert rendered == f"{len(items)}: " + " ".join(items)  # every item it holds, once
        seen += items
    assert sorted(seen) == sorted(f"s{n}" for n in range(total))  # none dropped or doubled


OPEN_RUN = """
INSERT INTO workflow_runs (id, tenant_id, workflow_key, recipient, definition, created_by,
                           starts_at, digest_key, digest_closes_at, digest_items)
VALUES ($1, 'TEN-0001', 'interview', 'cand-1', '{}', 'svc', now(), 'app-1',
        now() + interval '1 hour', 1)
"""


async def test_closing_a_digest_waits_for_a_trigger_adding_to_it_and_then_takes_no_more(
    database_url: str,
) -> None:
    """The close and a trigger's append serialise on the run's row: the close that comes
    second reads the item, the append that comes second finds the run closed."""
    trigger_conn, firer_conn = (
        await asyncpg.connect(database_url),
        await asyncpg.connect(database_url),
    )
    try:
        run_id = uuid.uuid4()
        await trigger_conn.execute(OPEN_RUN, run_id)
        await trigger_conn.execute(
            "INSERT INTO workflow_run_items (run_id, seq, tenant_id, data) "
            "VALUES ($1, 1, 'TEN-0001', '\"first\"')",
            run_id,
        )
        adding = trigger_conn.transaction()
        await adding.start()
        joined = await workflow_store.join_digests(
            trigger_conn, "TEN-0001", "interview", ["cand-1"], "app-1", '"second"', 100
        )
        assert joined == {"cand-1": run_id}
        closing = asyncio.ensure_future(workflow_store.close_digest(firer_conn, "TEN-0001", run_id))
        done, _ = await asyncio.wait({closing}, timeout=0.5)
        assert not done, "the close must wait for the trigger adding to the run"
        await adding.commit()
        assert await closing == [
            '"first"',
            '"second"',
        ]  # jsonb as text: no codec on this connection
        # the run is closed: the next trigger's data does not join it
        joined = await workflow_store.join_digests(
            trigger_conn, "TEN-0001", "interview", ["cand-1"], "app-1", '"third"', 100
        )
        assert joined == {}
    finally:
        await trigger_conn.close()
        await firer_conn.close()
