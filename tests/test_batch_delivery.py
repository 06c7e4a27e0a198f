"""The dispatcher and the in-app sender work whole stream reads at once; the decisions must
stay those of one entry at a time: preferences apply per row, a delivery a live peer holds is
left pending (and taken over once its lease runs out), nothing is sent twice."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.ids import uuid7
from notifyd.payloads import DeliveryRef
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

TENANT = "TEN-0001"
FAST = {"NOTIFYD_CLAIM_IDLE": "2", "NOTIFYD_SEND_TIMEOUT": "1", "NOTIFYD_SWEEP_INTERVAL": "0.2"}


async def test_a_burst_is_dispatched_with_each_users_preferences(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory()
    async with Api(daemon) as api:
        status, _, _ = await api.request(
            "PUT",
            "/preferences/",
            json={"categories": {"marketing": False}},
            tenant=TENANT,
            user="u-quiet",
        )
        assert status == 200

        async def send(n: int) -> None:
            user = "u-quiet" if n % 4 == 0 else f"u-{n % 5}"
            status, body, _ = await api.post(
                "/notifications/send/",
                {
                    "notification_type": "in_app",
                    "recipient": user,
                    "message": f"m{n}",
                    "category": "marketing",
                },
                tenant=TENANT,
                user="backend",
                role="service",
            )
            assert status == 202, body

        await asyncio.gather(*(send(n) for n in range(200)))

    async def settled() -> bool:
        pending = await db.fetchval(
            "SELECT count(*) FROM notifications WHERE status NOT IN ('sent', 'suppressed')"
        )
        return bool(pending == 0)

    await wait_for(settled, timeout=30)
    rows = await db.fetch("SELECT user_id, status, attempts FROM notifications")
    assert {r["status"] for r in rows if r["user_id"] == "u-quiet"} == {"suppressed"}
    assert {r["status"] for r in rows if r["user_id"] != "u-quiet"} == {"sent"}
    assert sum(r["user_id"] == "u-quiet" for r in rows) == 50
    assert {r["attempts"] for r in rows if r["status"] == "sent"} == {1}  # each sent once


async def test_a_delivery_a_peer_holds_stays_pending_until_its_lease_runs_out(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory(**FAST)
    held = uuid7()
    await db.execute(
        "INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient, "
        "body, status, attempts, claimed_at) "
        "VALUES ($1, $2, 'backend', 'u-1', 'in_app', 'u-1', 'hi', 'sending', 1, now())",
        held,
        TENANT,
    )
    stream = f"{daemon.settings.redis_prefix}:deliver:in_app"
    await redis.xadd(stream, DeliveryRef(TENANT, str(held)).to_fields())

    async def left_pending() -> bool:
        try:
            info = await redis.xpending(stream, "send")
        except ResponseError:  # NOGROUP: the sender has not made its group yet (from id 0)
            return False
        return bool(info["pending"] == 1)

    await wait_for(left_pending, timeout=10)
    assert await db.fetchval("SELECT status FROM notifications WHERE id = $1", held) == "sending"

    async def taken_over() -> bool:
        row = await db.fetchrow("SELECT status, attempts FROM notifications WHERE id = $1", held)
        assert row is not None
        return bool(row["status"] == "sent")

    await wait_for(taken_over, timeout=20)  # the "peer" went quiet past NOTIFYD_CLAIM_IDLE
    row = await db.fetchrow("SELECT attempts FROM notifications WHERE id = $1", held)
    assert row is not None and row["attempts"] == 2

    async def acknowledged() -> bool:
        info = await redis.xpending(stream, "send")
        return bool(info["pending"] == 0)

    await wait_for(acknowledged, timeout=10)


async def test_an_intent_for_a_missing_row_is_dead_lettered_and_the_rest_go_on(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory(**FAST)
    prefix = daemon.settings.redis_prefix
    ghost = str(uuid.uuid4())
    await redis.xadd(f"{prefix}:intents", {"v": b"1", "data": b'{"tenant_id": "TEN-0001"}'})
    from notifyd.payloads import NotificationIntent

    await redis.xadd(f"{prefix}:intents", NotificationIntent(TENANT, ghost).to_fields())
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": "u-2", "message": "still delivered"},
            tenant=TENANT,
            user="backend",
            role="service",
        )
    assert status == 202

    async def delivered() -> bool:
        state = await db.fetchval(
            "SELECT status FROM notifications WHERE id = $1", uuid.UUID(body["notification_id"])
        )
        return bool(state == "sent")

    await wait_for(delivered, timeout=10)

    async def dead_lettered() -> bool:
        return bool(await redis.xlen(f"{prefix}:dead") == 2)

    await wait_for(dead_lettered, timeout=10)
    reasons = [fields[b"reason"] for _, fields in await redis.xrange(f"{prefix}:dead")]
    assert any(ghost.encode() in reason for reason in reasons)


async def test_acknowledged_intents_are_trimmed_by_the_housekeeper(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Redis keeps acknowledged entries until something trims them: the housekeeper does,
    once every group is past them, so a busy stream holds its backlog, not its history."""
    daemon = await daemon_factory(NOTIFYD_SWEEP_INTERVAL="0.2")
    intents = f"{daemon.settings.redis_prefix}:intents"
    async with Api(daemon) as api:

        async def send(n: int) -> None:
            status, body, _ = await api.post(
                "/notifications/send/",
                {"notification_type": "in_app", "recipient": f"u-{n % 9}", "message": "m"},
                tenant=TENANT,
                user="backend",
                role="service",
            )
            assert status == 202, body

        await asyncio.gather(*(send(n) for n in range(400)))

    async def all_sent() -> bool:
        return bool(
            await db.fetchval("SELECT count(*) FROM notifications WHERE status = 'sent'") == 400
        )

    await wait_for(all_sent, timeout=30)

    async def trimmed() -> bool:
        return bool(await redis.xlen(intents) < 200)  # MINID ~ keeps at most a node's worth

    await wait_for(trimmed, timeout=15)
    pending: Any = await redis.xpending(intents, "dispatch")
    assert pending["pending"] == 0
