"""Outbound webhooks (issue 29), against a real local HTTP receiver that verifies every request
with the `standardwebhooks` package's `Webhook(secret).verify(...)`, unchanged.

Promises checked:
- Signed per the Standard Webhooks specification: every request verifies with the secret the
  create answered (once), body `{type, timestamp, data}`; a rotation signs with both secrets
  for the overlap, so receivers holding either verify.
- Durable, at least once, the same `webhook-id` every time: a receiver that answers 500 or
  hangs past the timeout gets the event again with the same id until it answers 2xx; a
  `kill -9` of `notifyd serve` with the request in flight loses nothing; a replay sends the
  same id again. An endpoint failing every attempt for NOTIFYD_WEBHOOK_RETRY_FOR is disabled.
- Tenants cost each other nothing: one tenant's hanging endpoint never delays another
  tenant's webhooks; a tenant has at most NOTIFYD_WEBHOOK_ENDPOINTS_PER_TENANT endpoints.
- Tenants never see each other: another tenant's endpoint (and its deliveries) is a 404 to
  every route, and absent from the list.
- A tenant is an adversary: a URL the egress policy refuses (or http:// where not allowed) is
  a 422 naming `url`, and the policy is checked again where the connection is made (a name
  that resolves elsewhere later is refused then: no DNS rebinding); secrets are stored only
  sealed, never in clear.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from notifyd.actors.housekeeper import Housekeeper, Retention
from notifyd.app import Daemon
from notifyd.egress import Address, Egress
from notifyd.metrics import Metrics
from notifyd.settings import Settings
from notifyd.store.pool import close_pool, create_pool
from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import ROOT, Api, base_env, make_settings, token, wait_for

KEY = "webhook-test-key"
TENANT = "TEN-HOOK"
OTHER = "TEN-OTHER"
BASE = "/webhooks/endpoints/"

# a receiver on loopback, retries in a blink, a short timeout and lease
FAST = {
    "NOTIFYD_TENANT_SECRET_KEY": KEY,
    "NOTIFYD_WEBHOOK_ALLOW_HTTP": "true",
    "NOTIFYD_EGRESS_ALLOWED_NETWORKS": "127.0.0.0/8",
    "NOTIFYD_WEBHOOK_RETRY_BASE": "0.05",
    "NOTIFYD_WEBHOOK_RETRY_CAP": "0.2",
    "NOTIFYD_WEBHOOK_TIMEOUT": "1",
    "NOTIFYD_WEBHOOK_CONNECT_TIMEOUT": "0.5",
}


@dataclass
class Received:
    webhook_id: str
    body: dict[str, Any]
    signature: str
    verified_by: list[str]  # the receiver's secrets this request verifies with
    raw: bytes = b""  # the body as it came, and the headers: what other verifiers are given
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Receiver:
    """A tenant's endpoint: verifies every request with `standardwebhooks`; `plan` says how
    to answer the next requests (an int status, or "hang"), then 200."""

    port: int = 0
    secrets: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    plan: list[int | str] = field(default_factory=list)
    hang_forever: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ids(self) -> list[str]:
        return [r.webhook_id for r in self.received]

    def of_type(self, event_type: str) -> list[Received]:
        return [r for r in self.received if r.body["type"] == event_type]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        verified: dict[str, Any] = {}
        verified_by = []
        for secret in self.secrets:
            try:
                verified = Webhook(secret).verify(raw, headers)
            except WebhookVerificationError:
                continue
            verified_by.append(secret)
        assert verified_by, f"no secret verifies {headers}"
        self.received.append(
            Received(
                headers["webhook-id"],
                verified,
                headers["webhook-signature"],
                verified_by,
                raw,
                {key.lower(): value for key, value in headers.items()},
            )
        )
        self.arrived.set()
        if self.hang_forever:
            await asyncio.sleep(3600)
        answer = self.plan.pop(0) if self.plan else 200
        if answer == "hang":
            await asyncio.sleep(3600)
        return web.Response(status=int(answer), text="ok")


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    hook.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield hook
    finally:
        await runner.cleanup()


async def create(
    api: Api,
    url: str,
    events: list[str],
    *,
    tenant: str = TENANT,
    expect: int = 201,
) -> dict[str, Any]:
    status, body, _ = await api.post(
        BASE, {"url": url, "events": events}, tenant=tenant, user="admin-1", role="admin"
    )
    assert status == expect, body
    result: dict[str, Any] = body
    return result


async def admin(
    api: Api, method: str, path: str, *, tenant: str = TENANT, json: Any = None
) -> tuple[int, Any]:
    status, body, _ = await api.request(
        method, path, json=json, tenant=tenant, user="admin-1", role="admin"
    )
    return status, body


async def send_in_app(api: Api, recipient: str = "user-2", tenant: str = TENANT) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": recipient, "message": "hello"},
        tenant=tenant,
        user="svc",
        role="service",
    )
    assert status == 202, body
    return str(body["notification_id"])


def delivery_status(db: asyncpg.Connection, status: str) -> Callable[[], Awaitable[bool]]:
    """For `wait_for`: whether the (only) delivery row is in `status`."""

    async def reached() -> bool:
        return await db.fetchval("SELECT status FROM webhook_deliveries") == status

    return reached


async def delivery_rows(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM webhook_deliveries ORDER BY id"))


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    async with receiver() as found:
        yield found


@pytest.fixture
async def fast_api(daemon_factory: DaemonFactory) -> AsyncIterator[Api]:
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as client:
        yield client


# ------------------------------------------------------------------ the endpoints' routes


async def test_endpoints_are_created_listed_changed_and_deleted_with_the_secret_shown_once(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    created = await create(fast_api, hook.url, ["notification.sent", "notification.sent"])
    secret = created["secret"]
    assert secret.startswith("whsec_")
    Webhook(secret)  # the library reads it
    assert created["events"] == ["notification.sent"]  # each once
    assert created["enabled"] is True
    path = f"{BASE}{created['id']}/"

    status, listed = await admin(fast_api, "GET", BASE)
    assert status == 200
    assert [e["id"] for e in listed] == [created["id"]]
    assert all("secret" not in e for e in listed)
    status, one = await admin(fast_api, "GET", path)
    assert (status, "secret" in one) == (200, False)

    # stored sealed only: the secret's text is nowhere in the row
    row = await db.fetchrow("SELECT * FROM webhook_endpoints")
    assert row is not None
    assert secret not in repr(dict(row))
    assert secret[len("whsec_") :] not in repr(dict(row))

    status, changed = await admin(
        fast_api,
        "PATCH",
        path,
        json={"events": ["message.created"], "description": "CRM"},
    )
    assert status == 200, changed
    assert (changed["events"], changed["description"], changed["url"]) == (
        ["message.created"],
        "CRM",
        hook.url,
    )
    # audited, without the secret
    audited = await db.fetch("SELECT action, details FROM audit_log WHERE tenant_id = $1", TENANT)
    assert {r["action"] for r in audited} >= {
        "webhook.endpoint_create",
        "webhook.endpoint_update",
    }
    assert secret not in repr([dict(r) for r in audited])

    # a plain user or a service may not manage them
    for role in ("user", "service"):
        status, _, _ = await fast_api.request("GET", BASE, tenant=TENANT, role=role)
        assert status == 403

    status, _ = await admin(fast_api, "DELETE", path)
    assert status == 204
    status, _ = await admin(fast_api, "GET", path)
    assert status == 404


async def test_bad_bodies_name_the_field(fast_api: Api) -> None:
    status, body, _ = await fast_api.post(
        BASE,
        {"url": "ftp://x.example/", "events": ["nope"]},
        tenant=TENANT,
        role="admin",
    )
    assert status == 422, body
    assert {e["field"] for e in body["errors"]} == {"url", "events[0]"}


async def test_the_egress_policy_refuses_a_url_with_a_422_naming_url(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(NOTIFYD_TENANT_SECRET_KEY=KEY)  # no allowed networks, https
    async with Api(daemon) as api:
        for url, says in [
            ("https://127.0.0.1/hook", "loopback"),
            ("https://10.1.2.3/hook", "private"),
            ("https://169.254.169.254/latest/meta-data/", "link-local"),
            ("https://[::ffff:127.0.0.1]/hook", "loopback"),
            ("http://93.184.215.14/hook", "https"),
            ("https://93.184.215.14:22/hook", "port 22"),
        ]:
            body = await create(api, url, ["notification.sent"], expect=422)
            assert [e["field"] for e in body["errors"]] == ["url"], body
            assert says in body["errors"][0]["message"], body
        status, listed = await admin(api, "GET", BASE)
        assert (status, listed) == (200, [])
        # a PATCH's URL goes through the same policy
        created = await create(api, "https://93.184.215.14/hook", ["notification.sent"])
        status, body = await admin(
            api, "PATCH", f"{BASE}{created['id']}/", json={"url": "https://10.0.0.7/x"}
        )
        assert status == 422, body
        assert [e["field"] for e in body["errors"]] == ["url"]
        status, kept = await admin(api, "GET", f"{BASE}{created['id']}/")
        assert kept["url"] == "https://93.184.215.14/hook"


async def test_a_tenant_has_a_bounded_number_of_endpoints(
    daemon_factory: DaemonFactory, hook: Receiver
) -> None:
    daemon = await daemon_factory(**FAST, NOTIFYD_WEBHOOK_ENDPOINTS_PER_TENANT="2")
    async with Api(daemon) as api:
        await create(api, hook.url, ["notification.sent"])
        await create(api, hook.url, ["notification.sent"])
        body = await create(api, hook.url, ["notification.sent"], expect=409)
        assert body["type"] == "urn:notifyd:problem:too-many-endpoints"
        await create(api, hook.url, ["notification.sent"], tenant=OTHER)  # its own count


async def test_without_a_secret_key_nothing_is_stored_in_clear(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(NOTIFYD_WEBHOOK_ALLOW_HTTP="true")
    async with Api(daemon) as api:
        body = await create(api, "https://hooks.example/x", ["notification.sent"], expect=409)
        assert body["type"] == "urn:notifyd:problem:secret-key-missing"
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_idempotency_keys_never_store_a_secret(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    status, body, _ = await fast_api.request(
        "POST",
        BASE,
        json={"url": hook.url, "events": ["notification.sent"]},
        tenant=TENANT,
        role="admin",
        headers={"Idempotency-Key": "create-1"},
    )
    assert status == 201, body
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 0


# ------------------------------------------------------------------ tenant isolation


async def test_a_tenant_never_sees_or_manages_another_tenants_endpoints(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    hook.secrets.append((await create(fast_api, hook.url, ["notification.queued"]))["secret"])
    [endpoint] = (await admin(fast_api, "GET", BASE))[1]
    await send_in_app(fast_api)
    await wait_for(lambda: hook.received)
    [delivery] = await delivery_rows(db)
    path = f"{BASE}{endpoint['id']}/"
    for method, route, body in [
        ("GET", path, None),
        ("PATCH", path, {"url": "http://127.0.0.1:1/stolen"}),
        ("DELETE", path, None),
        ("POST", path + "rotate-secret/", None),
        ("GET", path + "deliveries/", None),
        ("POST", f"{path}deliveries/{delivery['id']}/replay/", None),
    ]:
        status, answer = await admin(fast_api, method, route, tenant=OTHER, json=body)
        assert status == 404, (method, route, answer)
    assert (await admin(fast_api, "GET", BASE, tenant=OTHER)) == (200, [])
    # and nothing changed
    status, still = await admin(fast_api, "GET", path)
    assert (status, still["url"]) == (200, hook.url)
    # another tenant's events reach its own endpoint, never this tenant's
    count = len(hook.received)
    async with receiver() as others:
        created = await create(fast_api, others.url, ["notification.queued"], tenant=OTHER)
        others.secrets.append(created["secret"])
        await send_in_app(fast_api, tenant=OTHER)
        await wait_for(lambda: others.received)
        await asyncio.sleep(0.3)
    assert len(hook.received) == count
    assert (
        await db.fetchval(
            "SELECT count(*) FROM webhook_deliveries d JOIN webhook_endpoints e "
            "ON e.id = d.endpoint_id WHERE d.tenant_id <> e.tenant_id"
        )
        == 0
    )


# ------------------------------------------------------------------ signed, durable delivery


async def test_events_arrive_signed_as_standard_webhooks_verify_them(
    fast_api: Api, hook: Receiver
) -> None:
    created = await create(
        fast_api,
        hook.url,
        ["notification.queued", "notification.sent", "notification.read", "message.created"],
    )
    hook.secrets.append(created["secret"])
    notification_id = await send_in_app(fast_api, recipient="user-2")
    await wait_for(lambda: hook.of_type("notification.sent"))
    status, body, _ = await fast_api.post(
        "/messages/send/", {"receiver_id": "user-3", "content": "hi"}, tenant=TENANT
    )
    assert status == 201, body
    await wait_for(lambda: hook.of_type("message.created"))
    status, marked, _ = await fast_api.post(
        "/notifications/mark-as-read/", {"ids": [notification_id]}, tenant=TENANT, user="user-2"
    )
    assert status == 200, marked
    await wait_for(lambda: hook.of_type("notification.read"))

    [queued] = hook.of_type("notification.queued")
    [sent] = hook.of_type("notification.sent")
    assert queued.body["data"]["notification_id"] == notification_id
    assert (sent.body["data"]["status"], sent.body["data"]["channel"]) == ("sent", "in_app")
    assert sent.body["timestamp"].endswith("Z")
    [message] = hook.of_type("message.created")
    assert message.body["data"]["message_id"] == body["message_id"]
    assert len(set(hook.ids())) == len(hook.received)  # one id per event


async def test_a_suppressed_notification_makes_its_event(fast_api: Api, hook: Receiver) -> None:
    hook.secrets.append((await create(fast_api, hook.url, ["notification.suppressed"]))["secret"])
    status, body, _ = await fast_api.request(
        "PUT", "/preferences/", json={"channels": {"in_app": False}}, tenant=TENANT, user="user-2"
    )
    assert status == 200, body
    notification_id = await send_in_app(fast_api, recipient="user-2")
    await wait_for(lambda: hook.received)
    [suppressed] = hook.received
    assert suppressed.body["type"] == "notification.suppressed"
    assert suppressed.body["data"]["notification_id"] == notification_id


async def test_reminders_and_workflow_steps_make_their_events(
    fast_api: Api, hook: Receiver
) -> None:
    """`reminder.fired` when a reminder fires (with the notifications it made) and
    `workflow.step` when a step's outcome is decided."""
    created = await create(fast_api, hook.url, ["reminder.fired", "workflow.step"])
    hook.secrets.append(created["secret"])
    now = datetime.now(UTC)
    status, reminder, _ = await fast_api.post(
        "/reminders/create/",
        {
            "application_id": "app-1",
            "candidate_id": "cand-1",
            "employer_id": "emp-1",
            "interview_time": (now + timedelta(days=1)).isoformat(),
            "reminder_time": (now + timedelta(seconds=1)).isoformat(),
        },
        tenant=TENANT,
        role="service",
    )
    assert status == 201, reminder
    status, body, _ = await fast_api.request(
        "PUT",
        "/workflows/welcome/",
        json={"steps": [{"channel": "in_app", "template_key": "welcome"}]},
        tenant=TENANT,
        role="admin",
    )
    assert status == 200, body
    status, body, _ = await fast_api.request(
        "PUT",
        "/templates/welcome/in_app/",
        json={"subject": "Hi", "text_body": "Welcome"},
        tenant=TENANT,
        role="admin",
    )
    assert status == 200, body
    status, triggered, _ = await fast_api.post(
        "/workflows/welcome/trigger/",
        {"recipients": ["cand-1"], "data": {}},
        tenant=TENANT,
        role="service",
    )
    assert status == 202, triggered
    await wait_for(lambda: hook.of_type("reminder.fired") and hook.of_type("workflow.step"))
    [fired] = hook.of_type("reminder.fired")
    assert fired.body["data"]["reminder_id"] == reminder["reminder_id"]
    assert len(fired.body["data"]["notification_ids"]) == 2  # candidate and employer
    [step] = hook.of_type("workflow.step")
    assert step.body["data"]["run_id"] == triggered["runs"][0]["run_id"]
    assert (step.body["data"]["workflow_key"], step.body["data"]["status"]) == ("welcome", "sent")


async def test_failures_are_retried_with_the_same_id_until_a_2xx(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    hook.secrets.append((await create(fast_api, hook.url, ["notification.queued"]))["secret"])
    hook.plan = [500, 503, "hang", 302]  # then 200
    await send_in_app(fast_api)
    await wait_for(lambda: len(hook.received) == 5, timeout=15)
    assert len(set(hook.ids())) == 1  # one event, the same webhook-id on every attempt
    [row] = await delivery_rows(db)
    await wait_for(delivery_status(db, "succeeded"), timeout=5)
    [endpoint] = (await admin(fast_api, "GET", BASE))[1]
    status, deliveries = await admin(fast_api, "GET", f"{BASE}{endpoint['id']}/deliveries/")
    assert status == 200
    [delivery] = deliveries
    assert delivery["id"] == hook.ids()[0] == str(row["id"])
    assert delivery["attempts"] == 5
    assert [a["status_code"] for a in delivery["attempt_log"]] == [500, 503, None, 302, 200]
    assert "no answer within" in delivery["attempt_log"][2]["error"]
    assert all(a["latency_ms"] >= 0 for a in delivery["attempt_log"])
    assert delivery["last_status_code"] == 200


async def test_replay_sends_the_same_id_again(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    created = await create(fast_api, hook.url, ["notification.queued"])
    hook.secrets.append(created["secret"])
    await send_in_app(fast_api)
    await wait_for(lambda: hook.received)
    [row] = await delivery_rows(db)
    await wait_for(delivery_status(db, "succeeded"), timeout=5)
    status, replayed = await admin(
        fast_api, "POST", f"{BASE}{created['id']}/deliveries/{row['id']}/replay/"
    )
    assert status == 202, replayed
    await wait_for(lambda: len(hook.received) == 2)
    assert hook.ids() == [str(row["id"])] * 2
    status, _ = await admin(
        fast_api, "POST", f"{BASE}{created['id']}/deliveries/{created['id']}/replay/"
    )
    assert status == 404


async def test_a_rotated_secret_signs_beside_the_old_one_for_the_overlap(
    fast_api: Api, hook: Receiver
) -> None:
    created = await create(fast_api, hook.url, ["notification.queued"])
    old = created["secret"]
    status, rotated = await admin(fast_api, "POST", f"{BASE}{created['id']}/rotate-secret/")
    assert status == 200, rotated
    new = rotated["secret"]
    assert new != old and new.startswith("whsec_")
    hook.secrets += [old, new]
    await send_in_app(fast_api)
    await wait_for(lambda: hook.received)
    [received] = hook.received
    assert len(received.signature.split(" ")) == 2  # both, during the overlap
    # receivers holding either secret verify it: they can switch at their own pace
    assert received.verified_by == [old, new]


async def test_after_the_overlap_only_the_new_secret_signs(
    daemon_factory: DaemonFactory, hook: Receiver
) -> None:
    daemon = await daemon_factory(**FAST, NOTIFYD_WEBHOOK_SECRET_OVERLAP="0")
    async with Api(daemon) as api:
        created = await create(api, hook.url, ["notification.queued"])
        status, rotated = await admin(api, "POST", f"{BASE}{created['id']}/rotate-secret/")
        assert status == 200
        hook.secrets.append(created["secret"])  # the old one: refused now
        hook.secrets.append(rotated["secret"])
        await send_in_app(api)
        await wait_for(lambda: hook.received)
    [received] = hook.received
    assert len(received.signature.split(" ")) == 1
    assert received.verified_by == [rotated["secret"]]  # the old secret no longer verifies


async def test_an_endpoint_failing_for_the_whole_window_is_disabled_with_an_alert(
    daemon_factory: DaemonFactory, hook: Receiver, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST, NOTIFYD_WEBHOOK_RETRY_FOR="1")
    async with Api(daemon) as api:
        created = await create(api, hook.url, ["notification.queued"])
        hook.secrets.append(created["secret"])
        hook.plan = [500] * 1000
        await send_in_app(api)

        async def disabled() -> bool:
            return await db.fetchval("SELECT NOT enabled FROM webhook_endpoints") is True

        await wait_for(disabled, timeout=10)
        status, endpoint = await admin(api, "GET", f"{BASE}{created['id']}/")
        assert (status, endpoint["enabled"]) == (200, False)
        assert "NOTIFYD_WEBHOOK_RETRY_FOR" in endpoint["disabled_reason"]
        assert daemon.metrics.webhook_endpoints_disabled._value.get() == 1
        await wait_for(delivery_status(db, "failed"), timeout=5)
        # nothing more is sent to a disabled endpoint; new events are not even stored
        count = len(hook.received)
        await send_in_app(api)
        await asyncio.sleep(0.5)
        assert len(hook.received) == count
        assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
        # turned back on, it gets the next events
        hook.plan = []
        status, endpoint = await admin(
            api, "PATCH", f"{BASE}{created['id']}/", json={"enabled": True}
        )
        assert (status, endpoint["enabled"], endpoint["disabled_reason"]) == (200, True, None)
        await send_in_app(api)
        await wait_for(lambda: len(hook.received) == count + 1)


async def test_a_turned_off_endpoint_fails_its_waiting_rows_and_never_holds_the_others(
    fast_api: Api, hook: Receiver, db: asyncpg.Connection
) -> None:
    """PATCH enabled: false fails the endpoint's waiting deliveries; rows of a turned-off
    endpoint still due (in flight when it was turned off) never take the slots of the
    tenant's other endpoints."""
    async with receiver() as off:
        off.plan = [500] * 1000
        off_endpoint = await create(fast_api, off.url, ["notification.queued"])
        off.secrets.append(off_endpoint["secret"])
        await send_in_app(fast_api)
        await wait_for(lambda: len(off.received) >= 2)  # failing, retried
        status, body = await admin(
            fast_api, "PATCH", f"{BASE}{off_endpoint['id']}/", json={"enabled": False}
        )
        assert (status, body["enabled"]) == (200, False)
        await wait_for(delivery_status(db, "failed"), timeout=5)
        # more due rows of the turned-off endpoint than the tenant has slots, oldest first
        for _ in range(10):
            await db.execute(
                """INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type,
                       occurred_at, data, next_attempt_at, window_start)
                   VALUES (notifyd_uuid7(), $1, $2, 'notification.queued', now(), '{}',
                           now() - interval '1 hour', now())""",
                TENANT,
                uuid.UUID(off_endpoint["id"]),
            )
        hook.secrets.append((await create(fast_api, hook.url, ["notification.queued"]))["secret"])
        count = len(off.received)
        await send_in_app(fast_api)
        await wait_for(lambda: hook.received, timeout=5)
        assert len(off.received) == count


async def test_a_hanging_endpoint_never_delays_another_tenants_webhooks(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(
        **{**FAST, "NOTIFYD_WEBHOOK_TIMEOUT": "30"},
        NOTIFYD_WEBHOOK_TENANT_CONCURRENCY="2",
        NOTIFYD_WEBHOOK_CONCURRENCY="8",
    )
    async with receiver() as slow, receiver() as healthy, Api(daemon) as api:
        slow.hang_forever = True
        slow.secrets.append((await create(api, slow.url, ["notification.queued"]))["secret"])
        healthy.secrets.append(
            (await create(api, healthy.url, ["notification.queued"], tenant=OTHER))["secret"]
        )
        for _ in range(20):  # the slow tenant's backlog: far more than its slots
            await send_in_app(api, tenant=TENANT)
        await wait_for(lambda: len(slow.received) == 2)  # its two slots, hanging
        for _ in range(5):
            count = len(healthy.received)
            started = asyncio.get_running_loop().time()
            await send_in_app(api, tenant=OTHER)
            await wait_for(lambda n=count: len(healthy.received) > n, timeout=5)
            # far inside the 30 s the slow tenant's requests hang for (a loaded test machine
            # takes some of it)
            assert asyncio.get_running_loop().time() - started < 3.0
        assert len(slow.received) == 2  # still hanging, still only its own slots


# ------------------------------------------------------------------ egress at connect time


@dataclass
class Dns:
    answers: dict[str, list[str]]

    async def resolve(self, host: str, port: int) -> list[Address]:
        return [ipaddress.ip_address(a) for a in self.answers[host]]


async def refused_as_loopback(db: asyncpg.Connection) -> bool:
    """The webhook delivery was refused by the egress policy for going to loopback."""
    error = await db.fetchval("SELECT last_error FROM webhook_deliveries")
    return error is not None and "loopback" in error


async def test_a_name_is_checked_where_it_connects_no_dns_rebinding(
    settings_factory: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    """Promise: the address checked is the address connected to. At create time the name
    resolves to a public address (stored); later it resolves to loopback, which this daemon
    does not allow: every attempt is refused there, and the receiver on loopback never gets
    a request."""
    async with receiver() as hook:
        settings = settings_factory(
            **{
                **FAST,
                "NOTIFYD_EGRESS_ALLOWED_NETWORKS": "",
                "NOTIFYD_WEBHOOK_ALLOWED_PORTS": "any",
            }
        )
        dns = Dns({"hooks.tenant.invalid": ["93.184.215.14"]})
        daemon = Daemon(settings, egress=Egress.from_settings(settings, dns.resolve))
        await daemon.start()
        try:
            async with Api(daemon) as api:
                url = f"http://hooks.tenant.invalid:{hook.port}/hook"
                created = await create(api, url, ["notification.queued"])
                hook.secrets.append(created["secret"])
                dns.answers["hooks.tenant.invalid"] = ["127.0.0.1"]  # rebinding
                await send_in_app(api)
                await wait_for(lambda: refused_as_loopback(db), timeout=5)
                assert hook.received == []
        finally:
            await daemon.stop()


async def test_a_name_connects_to_the_address_the_policy_checked(
    settings_factory: Callable[..., Settings],
) -> None:
    """A name only the policy's resolver knows (the system's cannot resolve `.invalid`)
    reaches the receiver it was checked for."""
    async with receiver() as hook:
        settings = settings_factory(**FAST)
        dns = Dns({"hooks.tenant.invalid": ["127.0.0.1"]})
        daemon = Daemon(settings, egress=Egress.from_settings(settings, dns.resolve))
        await daemon.start()
        try:
            async with Api(daemon) as api:
                url = f"http://hooks.tenant.invalid:{hook.port}/hook"
                hook.secrets.append((await create(api, url, ["notification.queued"]))["secret"])
                await send_in_app(api)
                await wait_for(lambda: hook.received)
        finally:
            await daemon.stop()


async def test_a_literal_address_is_checked_again_at_connect_time(
    daemon_factory: DaemonFactory, hook: Receiver, db: asyncpg.Connection
) -> None:
    """aiohttp never resolves an IP literal, so the sender checks it itself: an endpoint on
    loopback stored while the operator allowed it is refused once they no longer do."""
    allowed = await daemon_factory(**FAST)
    async with Api(allowed) as api:
        hook.secrets.append((await create(api, hook.url, ["notification.queued"]))["secret"])
    await allowed.stop()
    refusing = await daemon_factory(**{**FAST, "NOTIFYD_EGRESS_ALLOWED_NETWORKS": ""})
    async with Api(refusing) as api:
        await send_in_app(api)
        await wait_for(lambda: refused_as_loopback(db), timeout=5)
    assert hook.received == []


async def test_an_endless_answer_is_cut_off_and_a_2xx_still_counts(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """At most NOTIFYD_WEBHOOK_RESPONSE_MAX_BYTES of an answer are read: a receiver that
    streams forever after its 200 does not hold the request (or memory) to the timeout."""

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        while True:
            await response.write(b"x" * 65536)
            await asyncio.sleep(0.01)

    app = web.Application()
    app.router.add_post("/hook", endless)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    daemon = await daemon_factory(**{**FAST, "NOTIFYD_WEBHOOK_TIMEOUT": "10"})
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with Api(daemon) as api:
            await create(api, f"http://127.0.0.1:{port}/hook", ["notification.queued"])
            await send_in_app(api)
            await wait_for(delivery_status(db, "succeeded"), timeout=8)
        latency = await db.fetchval("SELECT last_latency_ms FROM webhook_deliveries")
        assert latency < 5000  # far inside the 10 s a whole read would run to
    finally:
        await runner.cleanup()


async def test_a_stop_hands_its_requests_in_flight_back(
    daemon_factory: DaemonFactory, hook: Receiver, db: asyncpg.Connection
) -> None:
    """A graceful stop (a deploy) cuts the requests in flight and hands their claims back at
    once: the next instance sends them without waiting for the lease, with the same id."""
    first = await daemon_factory(**{**FAST, "NOTIFYD_WEBHOOK_TIMEOUT": "30"})
    async with Api(first) as api:
        hook.secrets.append((await create(api, hook.url, ["notification.queued"]))["secret"])
        hook.hang_forever = True
        await send_in_app(api)
        await wait_for(lambda: hook.received)
    await first.stop()
    assert await db.fetchval("SELECT status FROM webhook_deliveries") == "pending"
    hook.hang_forever = False
    await daemon_factory(**{**FAST, "NOTIFYD_WEBHOOK_TIMEOUT": "30"})  # lease: 61 s
    await wait_for(lambda: len(hook.received) == 2, timeout=5)
    assert len(set(hook.ids())) == 1


# ------------------------------------------------------------------ kill -9


class Serve:
    """`python -m notifyd serve` as a child process (output to a file)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifyd", "serve"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill_9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def serve_env(database_url: str, redis_url: str) -> dict[str, str]:
    port = free_port()
    return {
        "PATH": os.environ.get("PATH", ""),
        **base_env(database_url, redis_url, NOTIFYD_PORT=str(port), **FAST),
    }


async def test_kill_9_between_the_commit_and_the_delivery_loses_nothing(
    serve_env: dict[str, str], tmp_path: Path, db: asyncpg.Connection
) -> None:
    """The notification is committed (and with it its delivery row); the webhook's request is
    in flight (the receiver hangs) when the process is killed. The restarted daemon sends it
    again, with the same webhook-id, once the dead claim's lease runs out."""
    async with receiver() as hook:
        process = Serve(serve_env, tmp_path / "serve-0.log")
        try:
            daemon_url = f"http://127.0.0.1:{serve_env['NOTIFYD_PORT']}"
            await _healthy(daemon_url, process)
            async with aiohttp.ClientSession() as http:
                api = _RemoteApi(http, daemon_url, serve_env)
                created = await api.create(hook.url)
                hook.secrets.append(created["secret"])
                hook.hang_forever = True
                await api.send_in_app()
                await wait_for(lambda: hook.received, timeout=10)
                assert await db.fetchval("SELECT status FROM webhook_deliveries") == "sending"
                process.kill_9()  # kill -9, the request in flight
                hook.hang_forever = False
                process = Serve(serve_env, tmp_path / "serve-1.log")
                await _healthy(daemon_url, process)
                await wait_for(lambda: len(hook.received) == 2, timeout=15)
            await wait_for(
                delivery_status(db, "succeeded"),
                timeout=5,
            )
            assert len(set(hook.ids())) == 1
            assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
        finally:
            process.kill_9()


async def _healthy(base: str, process: Serve) -> None:
    async with aiohttp.ClientSession() as http:

        async def up() -> bool:
            if process.proc.poll() is not None:
                raise AssertionError(process.log_path.read_text(errors="replace"))
            try:
                async with http.get(base + "/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_for(up, timeout=30, interval=0.05)


@dataclass
class _RemoteApi:
    http: aiohttp.ClientSession
    base: str
    env: dict[str, str]

    def _bearer(self, role: str) -> str:
        settings = make_settings(self.env["DATABASE_URL"], self.env["REDIS_URL"])
        return token(settings, TENANT, "admin-1" if role == "admin" else "svc", role)

    async def create(self, url: str) -> dict[str, Any]:
        async with self.http.post(
            self.base + BASE,
            json={"url": url, "events": ["notification.queued"]},
            headers={"Authorization": f"Bearer {self._bearer('admin')}"},
        ) as response:
            body: dict[str, Any] = await response.json(content_type=None)
            assert response.status == 201, body
            return body

    async def send_in_app(self) -> None:
        async with self.http.post(
            self.base + "/notifications/send/",
            json={"notification_type": "in_app", "recipient": "user-2", "message": "hi"},
            headers={"Authorization": f"Bearer {self._bearer('service')}"},
        ) as response:
            assert response.status == 202, await response.text()


# ------------------------------------------------------------------ retention


async def test_finished_deliveries_past_their_retention_are_purged(
    settings_factory: Callable[..., Settings], db: asyncpg.Connection
) -> None:
    """Promise: past NOTIFYD_RETAIN_WEBHOOK_DELIVERIES the housekeeper deletes succeeded and
    failed deliveries (their data and attempts); a waiting one, or a recent one, stays."""
    day = 86_400.0
    endpoint = uuid.UUID(int=(1 << 76) | (0b10 << 62) | 1)
    await db.execute(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, events, secret_enc) "
        "VALUES ($1, $2, 'https://h.example/', '{notification.sent}', 'sealed')",
        endpoint,
        TENANT,
    )
    rows = [
        (100 * day, "succeeded"),
        (100 * day, "failed"),
        (100 * day, "pending"),
        (day, "failed"),
    ]
    ids = []
    for n, (age, status) in enumerate(rows):
        ms = int((time.time() - age) * 1000)
        ids.append(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | n))
        await db.execute(
            """INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, event_type,
                   occurred_at, data, status, next_attempt_at, window_start, done_at)
               VALUES ($1, $2, $3, 'notification.sent', now(), '{}', $4, now(), now(),
                       CASE WHEN $4 <> 'pending' THEN now() - make_interval(secs => $5) END)""",
            ids[-1],
            TENANT,
            endpoint,
            status,
            age,
        )
    pool = await create_pool(settings_factory(), queue=True)
    try:
        housekeeper = Housekeeper(
            pool,
            ttl=day,
            interval=60,
            retention=Retention(webhook_deliveries=30 * day, pause=0),
            metrics=Metrics(),
        )
        assert await housekeeper.purge_expired() == {"webhook_deliveries": 2}
    finally:
        await close_pool(pool)
    left = await db.fetch("SELECT id FROM webhook_deliveries ORDER BY id")
    assert [r["id"] for r in left] == ids[2:]
