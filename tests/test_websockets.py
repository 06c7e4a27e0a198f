"""Live notifications over WebSocket: /ws/notifications/{tenant_id}/{user_id}/."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from notifyd.app import Daemon
from tests.conftest import DaemonFactory
from tests.helpers import Api, next_json, token, wait_for
from tests.smtp_sink import SmtpSink

TENANT, USER = "TEN-0001", "auth0|42"
PATH = f"/ws/notifications/{TENANT}/{USER}/"


def url(daemon: Daemon, path: str = PATH) -> str:
    return f"ws://127.0.0.1:{daemon.port}{path}"


async def next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> Any:
    """The next frame of one type (a live event may come first: the socket subscribes
    before it reads the count, so that nothing is missed in between)."""
    while True:
        event = await next_json(ws)
        if event["type"] == kind:
            return event


async def send_in_app(daemon: Daemon, message: str, user: str = USER) -> str:
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": user, "message": message},
            tenant=TENANT,
            user="backend",
            role="service",
        )
    assert status == 202, body
    return str(body["notification_id"])


async def test_a_new_in_app_notification_arrives_live(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    bearer = token(daemon.settings, TENANT, USER)
    async with session.ws_connect(url(daemon), headers={"Authorization": f"Bearer {bearer}"}) as ws:
        assert await next_json(ws) == {"type": "unread_count", "count": 0}
        notification_id = await send_in_app(daemon, "Interview moved to 11:00")
        event = await next_json(ws)
        assert event["type"] == "notification"
        assert (event["id"], event["message"]) == (notification_id, "Interview moved to 11:00")


@pytest.mark.parametrize("how", ["subprotocol", "query"])
async def test_browsers_pass_the_token_as_subprotocol_or_query(
    daemon: Daemon, session: aiohttp.ClientSession, how: str
) -> None:
    bearer = token(daemon.settings, TENANT, USER)
    if how == "subprotocol":
        ws = await session.ws_connect(url(daemon), protocols=("bearer", bearer))
        assert ws.protocol == "bearer"
    else:
        ws = await session.ws_connect(url(daemon) + f"?token={bearer}")
    async with ws:
        assert (await next_json(ws))["type"] == "unread_count"


async def test_a_foreign_or_bad_token_closes_with_a_clear_code(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    other = token(daemon.settings, TENANT, "someone-else")
    async with session.ws_connect(url(daemon), headers={"Authorization": f"Bearer {other}"}) as ws:
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert (ws.close_code, message.extra) == (4003, "this is not your notification channel")
    foreign = token(daemon.settings, "TEN-OTHER", USER)
    async with session.ws_connect(
        url(daemon), headers={"Authorization": f"Bearer {foreign}"}
    ) as ws:
        await ws.receive(timeout=10)
        assert ws.close_code == 4003
    async with session.ws_connect(url(daemon) + "?token=not.a.jwt") as ws:
        message = await ws.receive(timeout=10)
        assert ws.close_code == 4001
        assert "malformed" in message.extra
    expired = token(daemon.settings, TENANT, USER, ttl=-3600)
    async with session.ws_connect(url(daemon), protocols=("bearer", expired)) as ws:
        message = await ws.receive(timeout=10)
        assert (ws.close_code, message.extra) == (4001, "token has expired")


async def test_an_origin_outside_the_allow_list_is_refused(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_ALLOWED_ORIGINS="https://app.example.com")
    bearer = token(daemon.settings, TENANT, USER)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(
            url(daemon) + f"?token={bearer}", headers={"Origin": "https://evil.example.com"}
        )
    assert refused.value.status == 403
    async with session.ws_connect(
        url(daemon) + f"?token={bearer}", headers={"Origin": "https://app.example.com"}
    ) as ws:
        assert (await next_json(ws))["type"] == "unread_count"


async def test_a_notification_sent_through_instance_b_reaches_a_socket_on_instance_a(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    a = await daemon_factory(NOTIFYD_INSTANCE_NAME="a")
    b = await daemon_factory(NOTIFYD_INSTANCE_NAME="b")
    bearer = token(a.settings, TENANT, USER)
    async with session.ws_connect(url(a) + f"?token={bearer}") as ws:
        await next_json(ws)
        notification_id = await send_in_app(b, "via b")
        event = await next_json(ws)
        assert event["id"] == notification_id


async def test_mark_read_over_the_socket_updates_the_count_everywhere(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    bearer = token(daemon.settings, TENANT, USER)
    first = await send_in_app(daemon, "one")
    await send_in_app(daemon, "two")
    async with (
        session.ws_connect(url(daemon) + f"?token={bearer}") as one,
        session.ws_connect(url(daemon) + f"?token={bearer}") as two,
    ):
        assert (await next_of_type(one, "unread_count"))["count"] == 2
        assert (await next_of_type(two, "unread_count"))["count"] == 2
        await one.send_str(orjson.dumps({"type": "mark_read", "ids": [first]}).decode())
        for ws in (one, two):
            event = await next_of_type(ws, "unread_count")
            assert (event["count"], event["updated"]) == (1, 1)
        await one.send_str("not json")
        # (the two notifications' live events may still be arriving: wait for the answer)
        assert (await next_of_type(one, "error"))["code"] == "bad_frame"


async def test_a_client_that_does_not_read_is_disconnected_and_others_keep_receiving(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis_url: str
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_SEND_QUEUE="4")
    bearer = token(daemon.settings, TENANT, USER)
    slow = await session.ws_connect(url(daemon) + f"?token={bearer}", max_msg_size=0)
    fast = await session.ws_connect(
        url(daemon, f"/ws/notifications/{TENANT}/fast/")
        + f"?token={token(daemon.settings, TENANT, 'fast')}"
    )
    await next_json(fast)
    channel = daemon_keys_channel(daemon, USER)
    redis = Redis.from_url(redis_url)
    try:
        big = orjson.dumps({"type": "notification", "message": "x" * 200_000})
        for _ in range(200):  # far more than the socket buffers hold while nobody reads
            await redis.publish(channel, big)
        await redis.publish(daemon_keys_channel(daemon, "fast"), b'{"type": "still here"}')
    finally:
        await redis.aclose()
    assert (await next_json(fast))["type"] == "still here"

    async def closed() -> int | None:
        while True:
            message = await slow.receive(timeout=20)
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return slow.close_code

    assert await closed() == 4008
    await fast.close()
    await slow.close()
    metrics = daemon.metrics.render().decode()
    assert "notifyd_ws_dropped_slow_clients_total 1.0" in metrics


def daemon_keys_channel(daemon: Daemon, user: str) -> str:
    from notifyd.keys import Keys

    return Keys(daemon.settings.redis_prefix).user_events(TENANT, user)


async def test_shutdown_closes_sockets_with_going_away(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory()
    bearer = token(daemon.settings, TENANT, USER)
    ws = await session.ws_connect(url(daemon) + f"?token={bearer}")
    await next_json(ws)
    stopping = asyncio.create_task(daemon.stop())
    message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1001
    await ws.close()
    await stopping


def offset_key(offset: str) -> tuple[int, ...]:
    return tuple(int(part) for part in offset.split("-"))


async def test_a_reconnect_with_since_gets_exactly_what_it_missed_in_order(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    """Order is the user's history order (offsets), which is the order events went live."""
    bearer = token(daemon.settings, TENANT, USER)
    async with session.ws_connect(url(daemon) + f"?token={bearer}") as ws:
        await next_of_type(ws, "unread_count")
        await send_in_app(daemon, "seen 1")
        await send_in_app(daemon, "seen 2")
        seen = [await next_of_type(ws, "notification") for _ in range(2)]
    assert sorted(e["message"] for e in seen) == ["seen 1", "seen 2"]
    assert offset_key(seen[0]["offset"]) < offset_key(seen[1]["offset"])
    missed = [await send_in_app(daemon, f"missed {n}") for n in range(3)]

    async def all_sent() -> bool:
        async with Api(daemon) as api:
            _, listed, _ = await api.get("/notifications/", tenant=TENANT, user=USER)
        return all(n["status"] == "sent" for n in listed)

    await wait_for(all_sent, timeout=15)
    since = seen[1]["offset"]
    async with session.ws_connect(url(daemon) + f"?token={bearer}&since={since}") as ws:
        replayed = [await next_of_type(ws, "notification") for _ in missed]
        assert sorted(e["id"] for e in replayed) == sorted(missed)
        offsets = [offset_key(e["offset"]) for e in replayed]
        assert offsets == sorted(offsets)
        assert offsets[0] > offset_key(since)
        assert (await next_json(ws))["type"] == "unread_count"
        live = await send_in_app(daemon, "live again")
        assert (await next_of_type(ws, "notification"))["id"] == live  # no duplicate before it


async def test_a_reconnect_from_an_offset_no_longer_kept_is_told_to_refetch(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_HISTORY_LEN="3")
    assert daemon.pipeline is not None
    history = daemon.pipeline.history
    oldest = await history.publish(TENANT, USER, {"type": "notification", "n": 0})
    for n in range(1, 400):  # trimmed (approximately) to a few, far past `oldest`
        await history.publish(TENANT, USER, {"type": "notification", "n": n})
    bearer = token(daemon.settings, TENANT, USER)
    async with session.ws_connect(url(daemon) + f"?token={bearer}&since={oldest}") as ws:
        gap = await next_json(ws)
        assert gap["type"] == "gap"
        assert gap["since"] == oldest
        assert "refetch" in gap["detail"]
        kept = await next_json(ws)
        assert kept["type"] == "notification"
        assert kept["n"] > 1


async def test_delivery_status_of_the_users_email_arrives_live(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, smtp_sink: SmtpSink
) -> None:
    """An email (or SMS) sent on a user's behalf shows up in their open sockets as it goes:
    `sent`, or `retrying` then `failed`."""
    daemon = await daemon_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_sink.port),
        NOTIFYD_SEND_MAX_ATTEMPTS="2",
        NOTIFYD_RETRY_BASE="0.05",
        NOTIFYD_RETRY_CAP="0.1",
    )
    bearer = token(daemon.settings, TENANT, USER)
    async with session.ws_connect(url(daemon) + f"?token={bearer}") as ws:
        await next_of_type(ws, "unread_count")
        async with Api(daemon) as api:
            status, body, _ = await api.post(
                "/notifications/send/",
                {
                    "notification_type": "email",
                    "recipient": "ann@example.com",
                    "user_id": USER,
                    "subject": "Offer",
                    "message": "Welcome aboard",
                },
                tenant=TENANT,
                user="backend",
                role="service",
            )
            assert status == 202, body
            event = await next_of_type(ws, "delivery")
            assert (event["notification_id"], event["channel"], event["status"]) == (
                body["notification_id"],
                "email",
                "sent",
            )
            smtp_sink.fail_next(5, "451 Try again later")
            status, body, _ = await api.post(
                "/notifications/send/",
                {
                    "notification_type": "email",
                    "recipient": "ann@example.com",
                    "user_id": USER,
                    "subject": "Offer",
                    "message": "Second try",
                },
                tenant=TENANT,
                user="backend",
                role="service",
            )
            assert status == 202, body
            statuses = [(await next_of_type(ws, "delivery"))["status"] for _ in range(2)]
            assert statuses == ["retrying", "failed"]


async def test_closed_sockets_are_freed_without_waiting_for_the_cycle_collector(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    """A socket's objects must go when it closes, by reference counting: left in a cycle,
    they wait for a full collection, and with thousands of sockets open every full
    collection pauses the loop for about half a second. Served, refused and closed by the
    client: with the collector off, no server-side socket may be left once all are done."""
    daemon = await daemon_factory()
    bearer = token(daemon.settings, tenant=TENANT, user=USER)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            async with session.ws_connect(
                url(daemon), headers={"Authorization": f"Bearer {bearer}"}
            ) as ws:
                assert (await next_json(ws))["type"] == "unread_count"
        for path in (PATH, f"/ws/notifications/{TENANT}/someone-else/"):
            async with session.ws_connect(url(daemon, path)) as refused:  # no token / not mine
                await refused.receive(timeout=10)

        async def all_freed() -> bool:
            return not any(isinstance(o, web.WebSocketResponse) for o in gc.get_objects())

        await wait_for(all_freed, timeout=10)
    finally:
        gc.enable()


async def test_a_client_gone_right_after_the_upgrade_ends_its_socket_quietly(
    daemon: Daemon, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Promise: a client that drops the connection as soon as the upgrade is answered (a
    browser tab closed, a harness timing out) ends its socket like any other close, and no
    handler error is logged: a client cannot fill the daemon's log with tracebacks by
    connecting and leaving. (Both socket endpoints end through the same `live` block.)"""
    caplog.set_level(logging.INFO, logger="notifyd.http.websockets")
    bearer = token(daemon.settings, TENANT, USER)
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {bearer}\r\n\r\n"
    )
    leaving = 3
    async with db.transaction():  # holds each socket's unread count, its first frame
        await db.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        writers = []
        for _ in range(leaving):
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
            writer.write(request.encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            writers.append(writer)
        await asyncio.sleep(0.3)  # each handler is subscribed and waits for its count
        for writer in writers:
            writer.transport.abort()  # gone before the first frame is written
        await asyncio.sleep(0.3)  # the daemon sees each connection lost

    def closed() -> int:
        return sum(r.getMessage() == "websocket closed" for r in caplog.records)

    await wait_for(lambda: closed() == leaving, timeout=5)
    await asyncio.sleep(0.2)  # the handlers return (and aiohttp would log) after the close
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
