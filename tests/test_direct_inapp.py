"""In-app notifications are delivered by the dispatcher itself (`actors.direct_inapp`): one
publish and one UPDATE, no second stream hop. When the publish fails, the row takes the
ordinary way through the in-app sender and its retries, and still arrives once."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
from redis.asyncio import Redis

from notifyd.ids import uuid7
from notifyd.keys import Keys
from notifyd.payloads import NotificationIntent
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

TENANT = "TEN-0001"


async def _send(api: Api, user: str, message: str) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": user, "message": message},
        tenant=TENANT,
        user="backend",
        role="service",
    )
    assert status == 202, body
    notification_id: str = body["notification_id"]
    return notification_id


async def test_in_app_rows_go_from_queued_to_sent_without_the_sender_stream(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory()
    keys = Keys(daemon.settings.redis_prefix)
    async with Api(daemon) as api:
        ids = await asyncio.gather(*(_send(api, f"u-{n % 7}", f"m{n}") for n in range(120)))

    async def all_sent() -> bool:
        count = await db.fetchval("SELECT count(*) FROM notifications WHERE status = 'sent'")
        return bool(count == len(ids))

    await wait_for(all_sent, timeout=30)
    rows = await db.fetch(
        "SELECT id, user_id, body, attempts, provider_message_id, sent_at FROM notifications"
    )
    assert {r["attempts"] for r in rows} == {1}
    assert all(r["sent_at"] is not None for r in rows)
    # nothing went through the in-app sender's stream
    assert await redis.xlen(keys.deliver("in_app")) == 0
    # each row names the offset of its event on its user's feed, and that event is its own
    for row in rows:
        feed = keys.user_history(TENANT, row["user_id"])
        entries = await redis.xrange(feed, row["provider_message_id"], row["provider_message_id"])
        assert len(entries) == 1, row
        assert str(row["id"]).encode() in b"".join(entries[0][1].values())
    # one event per notification: none published twice
    events = 0
    for n in range(7):
        events += await redis.xlen(keys.user_history(TENANT, f"u-{n}"))
    assert events == len(ids)


async def test_a_failed_publish_falls_back_to_the_sender_and_its_retries(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory(NOTIFYD_RETRY_BASE="0.2", NOTIFYD_RETRY_CAP="0.5")
    keys = Keys(daemon.settings.redis_prefix)
    broken_feed = keys.user_history(TENANT, "u-broken")
    # a key of the wrong type: every XADD to this user's feed fails in Redis itself
    await redis.set(broken_feed, "not a stream")
    async with Api(daemon) as api:
        stuck = await _send(api, "u-broken", "first")

        async def left_to_the_sender() -> bool:
            status = await db.fetchval(
                "SELECT status FROM notifications WHERE id = $1::uuid", stuck
            )
            return status in ("dispatched", "sending", "retrying")

        await wait_for(left_to_the_sender, timeout=15)
        assert (
            await db.fetchval(
                "SELECT provider_message_id FROM notifications WHERE id = $1::uuid", stuck
            )
            is None
        )

        await redis.delete(broken_feed)  # Redis is healthy again

        async def sent() -> bool:
            status = await db.fetchval(
                "SELECT status FROM notifications WHERE id = $1::uuid", stuck
            )
            return bool(status == "sent")

        await wait_for(sent, timeout=30)
        assert await redis.xlen(broken_feed) == 1  # delivered once, after the fault
        # and the direct path goes on for everyone else
        other = await _send(api, "u-fine", "second")

        async def other_sent() -> bool:
            row = await db.fetchrow(
                "SELECT status, attempts FROM notifications WHERE id = $1::uuid", other
            )
            return row is not None and row["status"] == "sent"

        await wait_for(other_sent, timeout=15)
    assert await db.fetchval("SELECT attempts FROM notifications WHERE id = $1::uuid", other) == 1


async def test_rows_rendered_at_dispatch_are_delivered_directly_with_their_content(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Reminders and ingested events store their rows unrendered: the dispatcher renders
    them, and a good one goes straight to sent with its text stored, a broken one fails with
    the reason, a muted one is suppressed; none of them through the sender's stream."""
    daemon = await daemon_factory()
    keys = Keys(daemon.settings.redis_prefix)
    await db.execute(
        "INSERT INTO preferences (tenant_id, user_id, channels, categories) "
        """VALUES ($1, 'u-muted', '{"in_app": false}', '{}')""",
        TENANT,
    )
    rows = {
        "good": ("u-1", "interview_reminder", {"interview_time": "Monday 10:00"}),
        "broken": ("u-2", "interview_reminder", {}),  # interview_time missing
        "muted": ("u-muted", "interview_reminder", {"interview_time": "Monday 10:00"}),
    }
    ids = {}
    for name, (user, template, context) in rows.items():
        ids[name] = uuid7()
        await db.execute(
            "INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient,"
            " template_key, context) VALUES ($1, $2, 'reminders', $3, 'in_app', $3, $4, $5)",
            ids[name],
            TENANT,
            user,
            template,
            orjson.dumps(context).decode(),
        )
        await redis.xadd(keys.intents, NotificationIntent(TENANT, str(ids[name])).to_fields())

    async def settled() -> bool:
        states = await db.fetch(
            "SELECT status FROM notifications WHERE id = ANY($1::uuid[])", list(ids.values())
        )
        return all(s["status"] not in ("queued", "dispatched") for s in states)

    await wait_for(settled, timeout=15)
    good = await db.fetchrow("SELECT * FROM notifications WHERE id = $1", ids["good"])
    assert good is not None and good["status"] == "sent" and good["attempts"] == 1
    assert "Monday 10:00" in good["body"]
    feed = await redis.xrange(keys.user_history(TENANT, "u-1"))
    assert len(feed) == 1 and b"Monday 10:00" in b"".join(feed[0][1].values())
    broken = await db.fetchrow("SELECT * FROM notifications WHERE id = $1", ids["broken"])
    assert broken is not None and broken["status"] == "failed"
    assert "interview_time" in broken["last_error"]
    muted = await db.fetchval("SELECT status FROM notifications WHERE id = $1", ids["muted"])
    assert muted == "suppressed"
    assert await redis.xlen(keys.deliver("in_app")) == 0
