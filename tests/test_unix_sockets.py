"""A daemon on the same machine as its PostgreSQL and Redis reaches both over Unix sockets.

That is the cheaper way there (no TCP stack on either side: see docs/benchmarks.md), so
it has to work end to end: a REST send delivered live, and a chat message stored and
fanned out."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from redis.asyncio.connection import parse_url

from notifyd.app import Daemon
from scripts.localservers import PostgresServer, RedisServer
from tests.conftest import DaemonFactory
from tests.helpers import make_settings, token, wait_for
from tests.test_chat import connect, create_room, next_of_type
from tests.test_websockets import TENANT, USER, next_json, send_in_app, url


@pytest.fixture
async def unix_daemon(
    daemon_factory: DaemonFactory,
    pg_server: PostgresServer,
    redis_server: RedisServer,
    database_url: str,
    redis_url: str,  # flushed database 1; the same database over the socket below
) -> Daemon:
    database = urlsplit(database_url).path.lstrip("/")
    socket_database_url = pg_server.dsn(database, unix=True)
    socket_redis_url = redis_server.url(db=1, unix=True)
    assert socket_database_url.startswith("postgresql://postgres@/")
    assert socket_redis_url.startswith("unix://")
    return await daemon_factory(make_settings(socket_database_url, socket_redis_url))


async def test_rest_sends_and_chat_work_over_unix_sockets(
    unix_daemon: Daemon, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    daemon = unix_daemon
    bearer = token(daemon.settings, TENANT, USER)
    async with session.ws_connect(url(daemon), headers={"Authorization": f"Bearer {bearer}"}) as ws:
        assert await next_json(ws) == {"type": "unread_count", "count": 0}
        notification_id = await send_in_app(daemon, "over a socket")
        event = await next_json(ws)
        assert (event["type"], event["id"]) == ("notification", notification_id)

    async def sent() -> bool:
        value = await db.fetchval(
            "SELECT status FROM notifications WHERE id = $1::uuid", notification_id
        )
        return bool(value == "sent")

    await wait_for(sent, timeout=15)

    room = (await create_room(daemon, "alice", ["bob"]))["name"]
    async with (
        connect(session, daemon, room, "alice") as alice,
        connect(session, daemon, room, "bob") as bob,
    ):
        # a socket is set up (subscribed) once its first frame, `presence`, has arrived
        await next_of_type(alice, "presence")
        await next_of_type(bob, "presence")
        await alice.send_json({"message": "hello over a socket"})
        heard = await next_of_type(bob, "message")
        assert (heard["sender_id"], heard["message"]) == ("alice", "hello over a socket")
    stored = await db.fetchval("SELECT count(*) FROM messages WHERE sender_id = 'alice'")
    assert stored == 1


def test_socket_urls_survive_paths_with_characters_urls_give_meaning_to(tmp_path: Path) -> None:
    """`up --unix` URLs name the socket exactly, even under a folder with `#`, `+` or `%`."""
    base = tmp_path / "a#b+c%41"
    pg = PostgresServer(base, port=5999)
    redis = RedisServer(base, port=6999)
    dsn = urlsplit(pg.dsn("notifyd", unix=True))
    params = parse_qs(dsn.query, strict_parsing=True)  # as asyncpg and libpq read it
    assert params["host"] == [str(base / "pgsock")]
    assert params["port"] == ["5999"]
    assert redis.socket_path is not None
    kwargs = parse_url(redis.url(db=2, unix=True))
    assert kwargs["path"] == str(base / "redis.sock")
    assert kwargs["db"] == 2
