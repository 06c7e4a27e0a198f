"""Rate limits, daily quotas and socket caps (docs/limits.md), against real daemons, Redis
and PostgreSQL.

Promises checked (each test names its own): a `user` token past its burst gets 429
problem+json with Retry-After and nothing is stored for the refused sends; instances sharing
Redis share the limit; a `service` token at the defaults is not limited; the daily quota
refuses email past it on the global relay, not for a tenant with its own relay; the socket
cap refuses the socket past it (close 4029) and admits again after one closes, and a
crashed instance's sockets stop counting; an operator's override lowers or lifts a tenant's
limit; an ingested event past the daily quota is dead-lettered with the reason; the OpenAPI
document lists 429 on every limited route.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.http.limits import SOCKETS_FULL
from notifyd.keys import Keys
from notifyd.store import tenants
from notifyd.store.tenants import SmtpConfig, TenantSettings
from tests.conftest import DaemonFactory
from tests.helpers import Api, base_env, run_cli, token, wait_for
from tests.smtp_sink import SmtpSink
from tests.test_ingest_redis import consumed, dead_letters, event, publish, put_templates

TENANT = "TEN-0001"
SLOW = {"NOTIFYD_RATE_USER": "0.2", "NOTIFYD_RATE_USER_BURST": "3"}  # 3 now, then 1 / 5 s


def in_app(n: int, recipient: str = "someone") -> dict[str, Any]:
    return {"notification_type": "in_app", "recipient": recipient, "message": f"hello {n}"}


def email(n: int) -> dict[str, Any]:
    return {
        "notification_type": "email",
        "recipient": f"person{n}@example.com",
        "subject": "Hello",
        "message": f"hello {n}",
    }


async def stored_by(db: asyncpg.Connection, tenant: str, user: str) -> int:
    count: int = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE tenant_id = $1 AND created_by = $2", tenant, user
    )
    return count


def assert_refused(status: int, body: Any, headers: Any, limit: str) -> None:
    assert status == 429, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert int(headers["Retry-After"]) >= 1
    assert body["status"] == 429 and body["limit"] == limit, body
    assert "errors" not in body  # not a field's fault


async def test_a_user_token_past_its_burst_gets_429_with_retry_after_and_nothing_stored(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**SLOW)
    async with Api(daemon) as api:
        answers = [
            await api.post(path, in_app(n))
            for n, path in enumerate(["/notifications/send/", "/api/notifications/send/"] * 4)
        ]
        message = await api.post("/messages/send/", {"receiver_id": "user-2", "content": "hi"})
        other = await api.post("/notifications/send/", in_app(99), user="user-2")
    statuses = [status for status, _, _ in answers]
    assert statuses == [202, 202, 202, 429, 429, 429, 429, 429]
    for status, body, headers in answers[3:]:
        assert_refused(status, body, headers, "caller")
        assert body["type"] == "urn:notifyd:problem:rate-limited"
        assert int(headers["Retry-After"]) <= 5
    assert_refused(*message, "caller")  # messages share the caller's budget
    assert await stored_by(db, TENANT, "user-1") == 3
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert other[0] == 202  # another user of the tenant has a bucket of its own
    text = daemon.metrics.render().decode()
    assert 'notifyd_limit_refusals_total{limit="caller"} 6.0' in text


async def test_instances_sharing_redis_share_the_limit(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    first = await daemon_factory(**SLOW)
    second = await daemon_factory(**SLOW)
    async with Api(first) as one, Api(second) as two:
        statuses = [
            (await api.post("/notifications/send/", in_app(n)))[0]
            for n, api in enumerate([one, two] * 3)
        ]
    assert statuses == [202, 202, 202, 429, 429, 429]
    assert await stored_by(db, TENANT, "user-1") == 3


async def test_a_service_token_at_the_defaults_is_not_limited(
    daemon: Daemon, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    gate = asyncio.Semaphore(32)

    async def send(n: int) -> int:
        async with gate:
            status, _, _ = await api.post(
                "/notifications/send/", in_app(n, f"u{n}"), user="backend", role="service"
            )
            return status

    statuses = await asyncio.gather(*(send(n) for n in range(500)))
    assert statuses.count(202) == 500, sorted(set(statuses))
    assert await stored_by(db, TENANT, "backend") == 500
    # no bucket of its own (no Redis call for the caller); the tenant's is leased
    keys = Keys(daemon.settings.redis_prefix)
    assert await redis.exists(keys.caller_rate(TENANT, "service", "backend")) == 0
    assert await redis.exists(keys.tenant_rate(TENANT)) == 1


async def test_the_tenant_rate_bounds_all_callers_of_a_tenant_together(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(NOTIFYD_RATE_TENANT="0.2", NOTIFYD_RATE_TENANT_BURST="4")
    async with Api(daemon) as api:
        statuses = [
            (await api.post("/notifications/send/", in_app(n), user=f"user-{n}"))[0]
            for n in range(6)
        ]
        status, body, headers = await api.post("/notifications/send/", in_app(9), user="x")
    assert statuses == [202, 202, 202, 202, 429, 429]
    assert_refused(status, body, headers, "tenant")
    count = await db.fetchval("SELECT count(*) FROM notifications WHERE tenant_id = $1", TENANT)
    assert count == 4


async def test_the_daily_email_quota_counts_the_global_relay_only(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, smtp_sink: SmtpSink
) -> None:
    own = "TEN-OWN-RELAY"
    daemon = await daemon_factory(
        NOTIFYD_QUOTA_EMAIL_DAILY="2", EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port)
    )
    relay = SmtpConfig(
        host="127.0.0.1",
        port=smtp_sink.port,
        username="",
        password="",
        use_tls=False,
        use_ssl=False,
        from_email="own@example.com",
    )
    assert daemon.services is not None
    async with daemon.services.pool.acquire() as conn, conn.transaction():
        await tenants.save(conn, own, TenantSettings(smtp=relay), None)
    async with Api(daemon) as api:

        async def send(tenant: str, n: int) -> tuple[int, Any, Any]:
            return await api.post(
                "/notifications/send/", email(n), tenant=tenant, user="backend", role="service"
            )

        global_relay = [await send(TENANT, n) for n in range(4)]
        own_relay = [await send(own, n) for n in range(4)]
    assert [status for status, _, _ in global_relay] == [202, 202, 429, 429]
    for status, body, headers in global_relay[2:]:
        assert_refused(status, body, headers, "email_daily")
        assert body["type"] == "urn:notifyd:problem:quota-exceeded"
        # until midnight UTC
        assert int(headers["Retry-After"]) <= 86_400 - int(time.time()) % 86_400 + 1
    assert [status for status, _, _ in own_relay] == [202] * 4
    assert await stored_by(db, TENANT, "backend") == 2
    assert await stored_by(db, own, "backend") == 4


async def test_the_daily_sms_quota_counts_the_platforms_twilio_account(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(
        NOTIFYD_QUOTA_SMS_DAILY="1",
        TWILIO_ACCOUNT_SID="AC" + "0" * 32,
        TWILIO_AUTH_TOKEN="token-of-the-platform",
        TWILIO_PHONE="+15005550006",
        TWILIO_API_BASE_URL="http://127.0.0.1:1",  # never reached: acceptance is what counts
    )
    sms = {"notification_type": "sms", "recipient": "+14155550100", "message": "hi"}
    async with Api(daemon) as api:
        first = await api.post("/notifications/send/", sms, user="backend", role="service")
        second = await api.post("/notifications/send/", sms, user="backend", role="service")
    assert first[0] == 202, first[1]
    assert_refused(*second, "sms_daily")
    assert await stored_by(db, TENANT, "backend") == 1


async def open_socket(
    session: aiohttp.ClientSession, daemon: Daemon, user: str
) -> aiohttp.ClientWebSocketResponse:
    bearer = token(daemon.settings, TENANT, user)
    return await session.ws_connect(
        f"ws://127.0.0.1:{daemon.port}/ws/notifications/{TENANT}/{user}/",
        headers={"Authorization": f"Bearer {bearer}"},
    )


async def first_frame(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await ws.receive(timeout=10)


async def test_the_socket_cap_refuses_the_socket_past_it_and_admits_again_after_a_close(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    first = await daemon_factory(NOTIFYD_WS_MAX_PER_USER="2", NOTIFYD_WS_MAX_PER_TENANT="3")
    second = await daemon_factory(NOTIFYD_WS_MAX_PER_USER="2", NOTIFYD_WS_MAX_PER_TENANT="3")
    held = [await open_socket(session, first, "ann"), await open_socket(session, second, "ann")]
    for ws in held:
        assert json.loads((await first_frame(ws)).data)["type"] == "unread_count"
    refused = await open_socket(session, first, "ann")  # the user's third, any instance
    closing = await first_frame(refused)
    assert closing.type == aiohttp.WSMsgType.CLOSE
    assert (closing.data, refused.close_code) == (SOCKETS_FULL, SOCKETS_FULL)
    assert "sockets open" in str(closing.extra)
    await refused.close()

    bob = await open_socket(session, second, "bob")  # the tenant's third
    assert json.loads((await first_frame(bob)).data)["type"] == "unread_count"
    cara = await open_socket(session, first, "cara")  # the tenant's fourth
    assert (await first_frame(cara)).data == SOCKETS_FULL
    await cara.close()

    await held.pop().close()

    async def admitted() -> bool:
        ws = await open_socket(session, first, "ann")
        frame = await first_frame(ws)
        if frame.type == aiohttp.WSMsgType.TEXT:
            held.append(ws)
            return True
        await ws.close()
        return False

    await wait_for(admitted, timeout=10, interval=0.1)
    for ws in [*held, bob]:
        await ws.close()
    text = first.metrics.render().decode()
    assert 'notifyd_limit_refusals_total{limit="sockets_user"} 1.0' in text
    assert 'notifyd_limit_refusals_total{limit="sockets_tenant"} 1.0' in text


async def test_a_crashed_instances_sockets_stop_counting_once_they_expire(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis: Redis
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_MAX_PER_USER="1")
    keys = Keys(daemon.settings.redis_prefix)
    # what a crashed instance leaves: a seat nobody refreshes, its expiry passed
    expired = int(time.time() * 1000) - 1
    await redis.zadd(keys.user_sockets(TENANT, "ann"), {"crashed-conn": expired})
    await redis.zadd(keys.tenant_sockets(TENANT), {"crashed-conn": expired})
    ws = await open_socket(session, daemon, "ann")
    assert (await first_frame(ws)).type == aiohttp.WSMsgType.TEXT
    await ws.close()
    # ...while one still being refreshed holds its place
    alive = int(time.time() * 1000) + 60_000
    await redis.zadd(keys.user_sockets(TENANT, "bob"), {"other-instance": alive})
    ws = await open_socket(session, daemon, "bob")
    assert (await first_frame(ws)).data == SOCKETS_FULL
    await ws.close()


async def test_an_operator_override_lowers_or_lifts_a_tenants_limit(
    daemon_factory: DaemonFactory, database_url: str, redis_url: str, db: asyncpg.Connection
) -> None:
    env = base_env(database_url, redis_url)
    lowered, lifted = "TEN-LOW", "TEN-HIGH"

    def cli(*args: str) -> Any:
        result = run_cli("limits", *args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    cli("set", "--tenant", lowered, "--rate-user-burst", "2", "--rate-user", "0.2")
    cli("set", "--tenant", lifted, "--rate-user", "0")
    shown = json.loads(cli("show", "--tenant", lowered, "--json"))
    assert shown["limits"]["rate_user_burst"] == 2
    assert shown["overrides"]["rate_user_burst"]["updated_by"] == "cli"
    assert "override by cli" in cli("show", "--tenant", lowered)
    assert await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant_id = $1 AND action = 'limits.set'", lowered
    )
    daemon = await daemon_factory(**SLOW, NOTIFYD_LIMITS_REFRESH="0.2")
    async with Api(daemon) as api:

        async def statuses(tenant: str, count: int, user: str = "user-1") -> list[int]:
            return [
                (await api.post("/notifications/send/", in_app(n), tenant=tenant, user=user))[0]
                for n in range(count)
            ]

        assert await statuses(lowered, 4) == [202, 202, 429, 429]
        assert await statuses(lifted, 10) == [202] * 10
        assert await statuses(TENANT, 4) == [202, 202, 202, 429]  # the defaults elsewhere

        cli("unset", "--tenant", lifted, "--rate-user")  # back to the defaults, while running

        async def limited_again() -> bool:
            return 429 in await statuses(lifted, 1, user="user-2")

        await wait_for(limited_again, timeout=10, interval=0.25)
    assert "0 override(s)" in cli("show", "--tenant", lifted)


def test_limits_set_refuses_bad_values_naming_the_flag(database_url: str, redis_url: str) -> None:
    env = base_env(database_url, redis_url)
    result = run_cli("limits", "set", "--tenant", "T", "--rate-user-burst", "0", env=env)
    assert result.returncode == 2
    assert "--rate-user-burst" in result.stderr
    result = run_cli("limits", "set", "--tenant", "T", "--email-daily", "1.5", env=env)
    assert result.returncode == 2 and "--email-daily" in result.stderr
    result = run_cli("limits", "set", "--tenant", "T", env=env)
    assert result.returncode == 2


async def test_the_openapi_document_lists_429_on_every_limited_route(api: Api) -> None:
    _, document, _ = await api.get("/openapi.json", auth=False)
    for path in (
        "/notifications/send/",
        "/api/notifications/send/",
        "/messages/send/",
        "/api/messages/send/",
        "/rooms/",
        "/api/rooms/",
        "/reminders/create/",
    ):
        answer = document["paths"][path]["post"]["responses"]["429"]
        assert "application/problem+json" in answer["content"], path
        assert "Retry-After" in answer["headers"], path


async def test_ingested_events_count_against_the_daily_quota_and_past_it_are_dead_lettered(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, redis: Redis, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(
        NOTIFYD_QUOTA_EMAIL_DAILY="1", EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port)
    )
    await put_templates(daemon, "TEN-A", ("email",))
    await publish(redis, event("evt-1", channels=["email"]))
    await consumed(redis)
    await publish(redis, event("evt-2", channels=["email"]))
    [dead] = await dead_letters(redis, 1)
    assert "daily quota of 1 emails" in dead["reason"], dead
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE tenant_id = 'TEN-A'") == 1
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == 1
