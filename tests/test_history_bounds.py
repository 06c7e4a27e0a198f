"""Bounded Redis for the live feeds: history streams expire after a period without events,
one `?since=` replay is bounded in events and bytes, and whatever a replay cannot give (an
expired stream, more than its bounds) ends in a `gap`, never in silently nothing."""

from __future__ import annotations

from typing import Any

import aiohttp
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.keys import Keys
from tests.conftest import DaemonFactory
from tests.helpers import Api, next_json, token, wait_for

TENANT, USER = "TEN-0001", "auth0|42"
PATH = f"/ws/notifications/{TENANT}/{USER}/"


async def frames_until_count(
    daemon: Daemon, session: aiohttp.ClientSession, since: str
) -> list[Any]:
    """Every frame a reconnect with `since` gets before its unread count (replay and gap)."""
    bearer = token(daemon.settings, TENANT, USER)
    url = f"ws://127.0.0.1:{daemon.port}{PATH}?token={bearer}&since={since}"
    frames = []
    async with session.ws_connect(url) as ws:
        while (frame := await next_json(ws))["type"] != "unread_count":
            frames.append(frame)
    return frames


def history_of(daemon: Daemon, user: str = USER) -> str:
    return Keys(daemon.settings.redis_prefix).user_history(TENANT, user)


async def test_every_write_leaves_the_history_stream_with_an_expiry(
    daemon_factory: DaemonFactory, redis: Redis
) -> None:
    """Promise: a feed's history stream expires NOTIFYD_WS_HISTORY_TTL after its last event,
    whichever path recorded it (REST send through the dispatcher's batch, a single publish,
    a chat room's feed), so made-up ids do not stay in Redis forever."""
    daemon = await daemon_factory(NOTIFYD_WS_HISTORY_TTL="3600")
    assert daemon.pipeline is not None
    async with Api(daemon) as api:
        for n in range(3):
            status, body, _ = await api.post(
                "/notifications/send/",
                {"notification_type": "in_app", "recipient": f"made-up-{n}", "message": "hi"},
                tenant=TENANT,
                user="backend",
                role="service",
            )
            assert status == 202, body

    async def all_recorded() -> bool:
        return all([await redis.exists(history_of(daemon, f"made-up-{n}")) for n in range(3)])

    await wait_for(all_recorded, timeout=15)
    history = daemon.pipeline.history
    await history.publish(TENANT, USER, {"type": "notification", "n": 1})
    await history.publish_room(TENANT, "hiring", {"type": "message", "n": 1})
    keys = Keys(daemon.settings.redis_prefix)
    streams = [history_of(daemon, f"made-up-{n}") for n in range(3)]
    streams += [history_of(daemon), keys.room_history(TENANT, "hiring")]
    for stream in streams:
        ttl_ms = await redis.pttl(stream)
        assert 3_500_000 < ttl_ms <= 3_600_000, (stream, ttl_ms)
    # every later event pushes the expiry forward again
    await redis.pexpire(history_of(daemon), 10_000)
    await history.publish(TENANT, USER, {"type": "notification", "n": 2})
    assert await redis.pttl(history_of(daemon)) > 3_500_000


async def test_a_replay_past_its_bound_in_events_ends_in_a_gap_and_holds_the_newest(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    """Promise: one replay sends at most NOTIFYD_WS_REPLAY_MAX_ENTRIES events: the newest,
    after a `gap` naming the first of them, so the client refetches the older ones over
    REST and the feed then continues without a hole."""
    daemon = await daemon_factory(NOTIFYD_WS_REPLAY_MAX_ENTRIES="5")
    assert daemon.pipeline is not None
    history = daemon.pipeline.history
    offsets = [
        await history.publish(TENANT, USER, {"type": "notification", "n": n}) for n in range(150)
    ]
    frames = await frames_until_count(daemon, session, offsets[0])
    assert frames[0]["type"] == "gap"
    assert (frames[0]["since"], frames[0]["until"]) == (offsets[0], offsets[145])
    assert "refetch GET /notifications/" in frames[0]["detail"]
    assert [f["n"] for f in frames[1:]] == [145, 146, 147, 148, 149]
    # within the bound: every event, and no gap
    frames = await frames_until_count(daemon, session, offsets[144])
    assert [f["n"] for f in frames] == [145, 146, 147, 148, 149]


async def test_a_replay_past_its_bound_in_bytes_ends_in_a_gap(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    """Promise: one replay sends at most NOTIFYD_WS_REPLAY_MAX_BYTES of events, however few
    they are: large events are never all loaded into the daemon at once."""
    daemon = await daemon_factory(NOTIFYD_WS_REPLAY_MAX_BYTES="10000")
    assert daemon.pipeline is not None
    history = daemon.pipeline.history
    big = "x" * 3000
    offsets = [
        await history.publish(TENANT, USER, {"type": "notification", "n": n, "body": big})
        for n in range(10)
    ]
    frames = await frames_until_count(daemon, session, offsets[0])
    assert frames[0]["type"] == "gap"
    assert [f["n"] for f in frames[1:]] == [7, 8, 9]  # three of ~3 KB fit in 10,000 bytes
    assert frames[0]["until"] == offsets[7]


async def test_an_expired_history_answers_a_reconnect_with_a_gap(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis: Redis
) -> None:
    """Promise: a client reconnecting with an offset of a stream that has since expired is
    told to refetch, never silently given nothing; nor when the stream began again with a
    later event (what came between is gone with the old one)."""
    daemon = await daemon_factory(NOTIFYD_WS_HISTORY_TTL="1")
    assert daemon.pipeline is not None
    history = daemon.pipeline.history
    seen = await history.publish(TENANT, USER, {"type": "notification", "n": 0})
    await history.publish(TENANT, USER, {"type": "notification", "n": 1})

    async def expired() -> bool:
        return not await redis.exists(history_of(daemon))

    await wait_for(expired, timeout=10)
    frames = await frames_until_count(daemon, session, seen)
    assert [f["type"] for f in frames] == ["gap"]
    assert (frames[0]["since"], frames[0]["until"]) == (seen, None)
    # the feed begins again: the new event is replayed, after a gap for what expired
    again = await history.publish(TENANT, USER, {"type": "notification", "n": 2})
    frames = await frames_until_count(daemon, session, seen)
    assert [f["type"] for f in frames] == ["gap", "notification"]
    assert (frames[0]["until"], frames[1]["offset"]) == (again, again)


async def test_a_replay_from_the_beginning_of_a_kept_stream_has_no_gap(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    """Promise: `since=0` asks for everything kept; an untrimmed stream has all of it, and a
    stream never written has nothing to miss: no gap in either case."""
    assert daemon.pipeline is not None
    assert await frames_until_count(daemon, session, "0") == []
    await daemon.pipeline.history.publish(TENANT, USER, {"type": "notification", "n": 0})
    frames = await frames_until_count(daemon, session, "0")
    assert [f["type"] for f in frames] == ["notification"]
