"""Tenants' SMTP relay and templates from the team's auth service (NOTIFYD_TENANT_CONFIG_URL).

A real aiohttp server stands in for the auth service; the SMTP relays are the real sinks.
Promises checked (each test names its own): a send uses the tenant's relay and template from
the source; a change at the source reaches two instances within the TTL, and they revalidate
with If-None-Match (304 honoured); the source down keeps sends on the last good copy (metric +
log line); a tenant never fetched is retried (a transient error naming the source), not failed
for good, and its REST send is a 503; a malformed document changes nothing; two tenants never
see each other's configuration; the source's secrets and the bearer token never reach a log;
the sourced fields are shown and read-only in the settings API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.egress import Egress
from notifyd.http.openapi import build_document
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.providers.base import TransientError
from notifyd.settings import Settings
from notifyd.store.tenants import SourceUnavailable, region_for
from notifyd.tenant_config import Source, TenantConfigs, document_url
from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import Api, base_env, run_cli, wait_for
from tests.smtp_sink import Received, SmtpSink

TENANT_A = "TEN-0001"
TENANT_B = "TEN-0002"
BEARER = "auth-service-bearer-f00dfeed"
PASSWORD = "relay-pässword-9c1e5"
FROM_A = "hr@lumina.example"
FROM_B = "jobs@other.example"
CONTEXT = {"Candidate Name": "John Doe", "Position": "Senior Developer", "Company": "Lumina Care"}
TEMPLATE = {
    "template_key": "interviewScheduling",
    "channel": "email",
    "subject": "Interview Invitation: {{ Position }} at {{ Company }}",
    "text_body": "Dear {{ ctx['Candidate Name'] }}, please pick a time for {{ Position }}.",
}


class AuthService:
    """The stand-in: `docs[tenant] = {...}` (absent → 404), ETag = content hash, `down`
    answers 503, `hang` never answers in time; `requests` records (tenant, If-None-Match,
    Authorization, status)."""

    def __init__(self) -> None:
        self.docs: dict[str, Any] = {}
        self.raw: dict[str, bytes] = {}  # a tenant's body as is (malformed documents)
        self.down = False
        self.delay = 0.0  # seconds before each answer (a slow source)
        self.jwt_secret: str | None = None  # also accept JWTs signed with it
        self.jwt_claims: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None, str | None, int]] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tenants/{{tenant_id}}/notification-config"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        tenant = request.match_info["tenant"]
        if self.delay:
            await asyncio.sleep(self.delay)
        status, response = self._answer(request, tenant)
        self.requests.append(
            (
                tenant,
                request.headers.get("If-None-Match"),
                request.headers.get("Authorization"),
                status,
            )
        )
        return response

    def _answer(self, request: web.Request, tenant: str) -> tuple[int, web.Response]:
        if self.down:
            return 503, web.Response(status=503)
        if not self._authorized(request.headers.get("Authorization", ""), tenant):
            return 401, web.Response(status=401)
        raw = self.raw.get(tenant)
        if raw is None:
            if tenant not in self.docs:
                return 404, web.Response(status=404)
            raw = orjson.dumps(self.docs[tenant])
        etag = '"' + hashlib.sha256(raw).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            return 304, web.Response(status=304, headers={"ETag": etag})
        return 200, web.Response(body=raw, content_type="application/json", headers={"ETag": etag})

    def _authorized(self, header: str, tenant: str) -> bool:
        """The static token, or a JWT signed with the deployment's JWT_SECRET for this very
        tenant, as a service."""
        scheme, _, credentials = header.partition(" ")
        if scheme != "Bearer":
            return False
        if credentials == BEARER:
            return True
        if self.jwt_secret is None:
            return False
        try:
            claims = jwt.decode(credentials, self.jwt_secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            return False
        self.jwt_claims.append(claims)
        return bool(claims.get("tenant_id") == tenant and claims.get("role") == "service")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/tenants/{tenant}/notification-config", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def statuses(self, tenant: str) -> list[int]:
        return [status for t, _, _, status in self.requests if t == tenant]


@pytest.fixture
async def auth_service() -> AsyncIterator[AuthService]:
    service = AuthService()
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
def relay_a() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def relay_b() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


def document(relay: SmtpSink, from_email: str = FROM_A, **extra: Any) -> dict[str, Any]:
    return {
        "smtp": {
            "host": "127.0.0.1",
            "port": relay.port,
            "password": PASSWORD,  # no username: the sink has no AUTH, the password stays unused
            "from_email": from_email,
        },
        "default_locale": "en",
        "templates": [TEMPLATE],
        **extra,
    }


def env(service: AuthService, sink: SmtpSink, ttl: float = 30.0, **more: str) -> dict[str, str]:
    return {
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(sink.port),
        "EMAIL_FROM": "platform@notifyd.example",
        "NOTIFYD_TENANT_CONFIG_URL": service.url,
        "NOTIFYD_TENANT_CONFIG_TOKEN": BEARER,
        "NOTIFYD_TENANT_CONFIG_TTL": str(ttl),
        "NOTIFYD_TENANT_CONFIG_TIMEOUT": "1",
        # the relays are on loopback, which the egress policy refuses unless allowed
        "NOTIFYD_EGRESS_ALLOWED_NETWORKS": "127.0.0.0/8",
        "NOTIFYD_RETRY_BASE": "0.05",
        "NOTIFYD_RETRY_CAP": "0.5",
        "NOTIFYD_SEND_TIMEOUT": "2",
        **more,
    }


async def send(
    api: Api, tenant: str = TENANT_A, expect: int = 202, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "notification_type": "email",
        "recipient": "john.doe@example.com",
        "template_key": "interviewScheduling",
        "context": CONTEXT,
        **fields,
    }
    if body["template_key"] is None:
        del body["template_key"], body["context"]
    status, answer, _ = await api.post(
        "/notifications/send/", body, tenant=tenant, user="backend", role="service"
    )
    assert status == expect, answer
    return dict(answer)


async def arrived(sink: SmtpSink, count: int, timeout: float = 20) -> list[Received]:
    return await asyncio.to_thread(sink.wait_for, count, timeout)


@asynccontextmanager
async def clocked(
    settings: Settings, redis_url: str, ttl: float
) -> AsyncIterator[tuple[TenantConfigs, list[float], Redis, Metrics]]:
    """A `TenantConfigs` on a clock the test moves (`now[0] = …`), with its Redis and
    metrics; closed after."""
    now = [0.0]
    metrics = Metrics()
    async with aiohttp.ClientSession() as http:
        redis = Redis.from_url(redis_url)
        egress = Egress.from_settings(settings)
        configs = TenantConfigs(
            Source(settings, http, egress),
            redis,
            Keys(settings.redis_prefix),
            metrics,
            ttl,
            clock=lambda: now[0],
        )
        try:
            yield configs, now, redis, metrics
        finally:
            await configs.close()
            egress.close()
            await redis.aclose()


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every log record with its extra fields (what the JSON formatter writes)."""
    return "\n".join(str(record.__dict__) for record in caplog.records)


# --- a send, end to end --------------------------------------------------------------------------


async def test_a_send_uses_the_tenants_relay_and_template_from_the_source(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    db: asyncpg.Connection,
) -> None:
    """Promise: with NOTIFYD_TENANT_CONFIG_URL, a tenant's email goes through the relay and
    from address its auth service names, rendered from the template it serves (the second
    seed's `send_notification_email.delay(...)`), nothing copied into notifyd."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(**env(auth_service, smtp_sink))
    async with Api(daemon) as api:
        await send(api, subject="Interview Invitation")
        [received] = await arrived(relay_a, 1)
    assert received.mail_from == FROM_A
    assert str(received.message["Subject"]) == (
        "Interview Invitation: Senior Developer at Lumina Care"
    )
    assert "Dear John Doe, please pick a time for Senior Developer." in str(
        received.message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    )
    assert smtp_sink.received == []  # not the platform's relay
    tenant, if_none_match, authorization, status = auth_service.requests[0]
    assert (tenant, if_none_match, authorization, status) == (
        TENANT_A,
        None,
        f"Bearer {BEARER}",
        200,
    )
    # nothing from the source was written to PostgreSQL
    assert await db.fetchval("SELECT count(*) FROM templates") == 0
    assert await db.fetchval("SELECT count(*) FROM tenants WHERE settings <> '{}'") == 0


async def test_a_workflow_step_is_rendered_from_the_sources_template(
    daemon_factory: DaemonFactory, auth_service: AuthService, smtp_sink: SmtpSink, relay_a: SmtpSink
) -> None:
    """Promise: a workflow's email step is rendered from the template the tenant's source
    serves (none stored in notifyd) and goes through the source's relay, as a send does."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(**env(auth_service, smtp_sink))
    async with Api(daemon) as api:
        for method, path, body, role in [
            (
                "PUT",
                "/workflows/interview/",
                {"steps": [{"channel": "email", "template_key": "interviewScheduling"}]},
                "admin",
            ),
            ("PUT", "/recipients/cand-1/", {"email": "john.doe@example.com"}, "service"),
            (
                "POST",
                "/workflows/interview/trigger/",
                {"recipients": ["cand-1"], "data": CONTEXT},
                "service",
            ),
        ]:
            status, answer, _ = await api.request(
                method, path, json=body, tenant=TENANT_A, user="backend", role=role
            )
            assert status in (200, 202), answer
        [received] = await arrived(relay_a, 1)
    assert str(received.message["Subject"]) == (
        "Interview Invitation: Senior Developer at Lumina Care"
    )
    assert received.mail_from == FROM_A


async def test_notifyd_send_renders_from_the_source_and_refuses_without_it(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    database_url: str,
    redis_url: str,
    db: asyncpg.Connection,
) -> None:
    """Promise: the operator's `notifyd send` sees the tenant's settings as the daemon does
    (a template only the source has is found, and delivered through the source's relay);
    with the source down it stores nothing and says why, as a REST send answers 503."""
    auth_service.docs[TENANT_A] = document(relay_a)
    settings = env(auth_service, smtp_sink)
    await daemon_factory(**settings)
    command = [
        "send",
        "--tenant",
        TENANT_A,
        "--to",
        "cand-1",
        "--channel",
        "email",
        "--recipient",
        "john.doe@example.com",
        "--template-key",
        "interviewScheduling",
        "--context",
        orjson.dumps(CONTEXT).decode(),
    ]
    cli_env = base_env(database_url, redis_url, **settings)
    result = await asyncio.to_thread(run_cli, *command, env=cli_env)
    assert result.returncode == 0, result.stderr
    [received] = await arrived(relay_a, 1)
    assert str(received.message["Subject"]) == (
        "Interview Invitation: Senior Developer at Lumina Care"
    )

    auth_service.down = True
    result = await asyncio.to_thread(run_cli, *command, env=cli_env)
    assert result.returncode == 1, result.stdout
    assert "tenant configuration source" in result.stderr
    assert "HTTP 503" in result.stderr and "nothing was stored" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM notifications") == 1


async def test_two_tenants_never_see_each_others_configuration(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    relay_b: SmtpSink,
) -> None:
    """Promise: tenants never see each other: each tenant's document is fetched for it alone
    and carries its mail only; a template only tenant A's source serves is unknown to B; a
    tenant the source has nothing for (404) keeps the platform's relay."""
    auth_service.docs[TENANT_A] = document(relay_a)
    auth_service.docs[TENANT_B] = {"smtp": document(relay_b, FROM_B)["smtp"]}
    daemon = await daemon_factory(**env(auth_service, smtp_sink))
    async with Api(daemon) as api:
        await send(api, TENANT_A)
        refused = await send(api, TENANT_B, expect=422)
        await send(api, TENANT_B, template_key=None, subject="Hi", message="plain")
        await send(api, "TEN-0003", template_key=None, subject="Hi", message="plain")
        [to_a] = await arrived(relay_a, 1)
        [to_b] = await arrived(relay_b, 1)
        [to_c] = await arrived(smtp_sink, 1)
        _, settings_b, _ = await api.get(
            "/tenants/current/settings/", tenant=TENANT_B, user="admin", role="admin"
        )
    assert "template_key" in str(refused)
    assert (to_a.mail_from, to_b.mail_from) == (FROM_A, FROM_B)
    assert to_c.mail_from == "platform@notifyd.example"
    assert settings_b["smtp"]["port"] == relay_b.port
    assert {t for t, *_ in auth_service.requests} == {TENANT_A, TENANT_B, "TEN-0003"}


# --- the cache: TTL, 304, two instances, the source down -------------------------------------


async def test_a_change_at_the_source_reaches_two_instances_within_the_ttl(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    relay_b: SmtpSink,
) -> None:
    """Promise: every instance uses the source's new relay within NOTIFYD_TENANT_CONFIG_TTL,
    and revalidates with If-None-Match meanwhile (an unchanged document is a 304)."""
    ttl = 1.0
    auth_service.docs[TENANT_A] = document(relay_a)
    first = await daemon_factory(**env(auth_service, smtp_sink, ttl))
    second = await daemon_factory(**env(auth_service, smtp_sink, ttl))
    async with Api(first) as api_1, Api(second) as api_2:
        await send(api_1)
        await send(api_2)
        await arrived(relay_a, 2)
        # unchanged past the TTL: revalidated with If-None-Match (304), not fetched again, by
        # whichever instance refreshes first (the other one then takes that validation from
        # Redis, `shared`, and may never ask the source itself)
        await wait_for(lambda: _revalidated(first, second), timeout=ttl * 4, interval=ttl / 5)
        assert all(r[1] is not None for r in auth_service.requests if r[3] == 304)
        auth_service.docs[TENANT_A] = document(relay_b, FROM_B)
        loop = asyncio.get_running_loop()
        changed = loop.time()
        for daemon in (first, second):
            await wait_for(
                lambda d=daemon: _relay_is(d, relay_b.port), timeout=ttl * 3, interval=0.05
            )
        within = loop.time() - changed
        await send(api_1)
        await send(api_2)
        received = await arrived(relay_b, 2)
    assert {r.mail_from for r in received} == {FROM_B}
    assert within <= ttl + 1.0  # the TTL, plus a refresh's round trip and the poll (2 cores)
    assert len(relay_a.received) == 2


async def relay_port(daemon: Daemon) -> int | None:
    """The SMTP port this instance would send tenant A's mail to right now."""
    assert daemon.pipeline is not None
    smtp = (await daemon.pipeline.tenant_settings.get(TENANT_A)).smtp
    return None if smtp is None else smtp.port


async def _relay_is(daemon: Daemon, port: int) -> bool:
    return await relay_port(daemon) == port


async def _revalidated(*daemons: Daemon) -> bool:
    """Whether one of `daemons` has revalidated its copy at the source (a 304)."""
    total = 0.0
    for daemon in daemons:
        await relay_port(daemon)  # a read, as a send makes one
        total += metric(daemon, 'notifyd_tenant_config_fetches_total{outcome="not_modified"}')
    return total >= 1


async def _refused(daemon: Daemon) -> bool:
    await relay_port(daemon)  # a read: refreshes are made when a read finds the copy old
    return metric(daemon, 'notifyd_tenant_config_fetches_total{outcome="refused"}') >= 1


def metric(daemon: Daemon, sample: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    for line in daemon.metrics.render().decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


async def test_304_is_honoured_and_instances_share_the_validated_version(
    settings_factory: Any,
    auth_service: AuthService,
    relay_a: SmtpSink,
    redis_url: str,
) -> None:
    """Promise: a refresh sends If-None-Match and keeps its copy on 304; a second instance
    whose copy has the version another instance just validated does not ask the source."""
    auth_service.docs[TENANT_A] = document(relay_a)
    settings: Settings = settings_factory(**env(auth_service, relay_a, 0.5))
    now = [0.0]
    async with aiohttp.ClientSession() as http:
        redis = Redis.from_url(redis_url)
        egress = Egress.from_settings(settings)
        try:
            one, two = (
                TenantConfigs(
                    Source(settings, http, egress),
                    redis,
                    Keys(settings.redis_prefix),
                    Metrics(),
                    10.0,
                    clock=lambda: now[0],
                )
                for _ in range(2)
            )
            got = await one.get(TENANT_A)
            assert (await two.get(TENANT_A)).smtp == got.smtp
            assert auth_service.statuses(TENANT_A) == [200, 200]
            # past the refresh point, inside the TTL: served at once, refreshed behind; the
            # version was validated at the source moments ago (by `two`): no request
            now[0] = 9.0
            assert await one.get(TENANT_A) is got
            await wait_for(lambda: not one._loading)
            assert len(auth_service.requests) == 2
            # that validation expired: `one` revalidates at the source, which answers 304
            await redis.delete(Keys(settings.redis_prefix).tenant_config(TENANT_A))
            now[0] = 30.0
            assert await one.get(TENANT_A) is got
            tenant, if_none_match, _, status = auth_service.requests[-1]
            assert (tenant, status) == (TENANT_A, 304)
            assert if_none_match is not None
            # and shares it: `two`, past its TTL, takes that validation without a request
            assert await two.get(TENANT_A) is not None
            assert len(auth_service.requests) == 3
            await one.close()
            await two.close()
        finally:
            egress.close()
            await redis.aclose()


async def test_the_source_down_keeps_sends_on_the_last_good_copy(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Promise: when the source fails, sends go on with the last good copy, with a metric
    (`notifyd_tenant_config_stale_total`) and a log line."""
    ttl = 0.5
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(**env(auth_service, smtp_sink, ttl))
    async with Api(daemon) as api:
        await send(api)
        await arrived(relay_a, 1)
        auth_service.down = True
        with caplog.at_level(logging.WARNING, logger="notifyd.tenant_config"):
            # past the TTL, the source failing: the copy is used stale, and said so
            await wait_for(lambda: _used_stale(daemon), timeout=ttl * 6, interval=ttl / 5)
            await send(api)
            await arrived(relay_a, 2)
    assert 503 in auth_service.statuses(TENANT_A)
    assert smtp_sink.received == []
    assert metric(daemon, "notifyd_tenant_config_stale_total") >= 1
    assert metric(daemon, 'notifyd_tenant_config_fetches_total{outcome="unreachable"}') >= 1
    assert "last good copy" in caplog.text


async def test_a_slow_source_keeps_sends_on_the_last_good_copy(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    relay_b: SmtpSink,
) -> None:
    """Promise: a source slower than a send may wait (1 s) does not hold sends: one read
    waits that long, the others go on at once with the last good copy (metric), and the new
    document is used once it arrives."""
    ttl = 0.5
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(
        **{**env(auth_service, smtp_sink, ttl), "NOTIFYD_TENANT_CONFIG_TIMEOUT": "4"}
    )
    assert await relay_port(daemon) == relay_a.port
    auth_service.delay = 2.0
    auth_service.docs[TENANT_A] = document(relay_b, FROM_B)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(ttl)  # the copy's TTL passing is the point of the test
    started = loop.time()
    assert await relay_port(daemon) == relay_a.port
    assert loop.time() - started < 1.5
    assert metric(daemon, "notifyd_tenant_config_stale_total") >= 1
    started = loop.time()
    # one read waited for the slow fetch; the next ones take the copy at once
    assert await relay_port(daemon) == relay_a.port
    assert loop.time() - started < 0.5
    async with Api(daemon) as api:
        started = loop.time()
        await send(api)  # accepted without waiting out the source
        assert loop.time() - started < 0.5
    await wait_for(lambda: _relay_is(daemon, relay_b.port), timeout=6, interval=0.1)
    # sent through whichever relay was current when the sender ran
    await wait_for(lambda: len(relay_a.received) + len(relay_b.received) == 1, timeout=10)


async def _used_stale(daemon: Daemon) -> bool:
    await relay_port(daemon)  # a read, as a send makes one
    return metric(daemon, "notifyd_tenant_config_stale_total") >= 1


async def test_a_tenant_never_fetched_is_retried_with_a_clear_error(
    daemon_factory: DaemonFactory, auth_service: AuthService, smtp_sink: SmtpSink
) -> None:
    """Promise: with no copy yet and the source down, a delivery for the tenant is a transient
    error naming the source (retried, not failed for good), and a REST send is a 503."""
    auth_service.down = True
    daemon = await daemon_factory(**env(auth_service, smtp_sink))
    assert daemon.pipeline is not None
    email = daemon.pipeline.providers[0]
    with pytest.raises(TransientError, match="tenant configuration not fetched yet"):
        await email.route(TENANT_A)
    async with Api(daemon) as api:
        answer = await send(api, expect=503)
    assert answer["type"].endswith("tenant-config-unavailable")
    auth_service.down = False
    auth_service.docs[TENANT_A] = {"default_locale": "en"}
    await wait_for(lambda: _route(email, TENANT_A), timeout=10, interval=0.5)


async def _route(email: Any, tenant: str) -> bool:
    try:
        await email.route(tenant)
    except TransientError:
        return False
    return True


async def test_a_malformed_document_changes_nothing(
    settings_factory: Any,
    auth_service: AuthService,
    relay_a: SmtpSink,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Promise: a bad document (a field the API would refuse, a template that does not
    compile, not JSON, too large) is refused whole: the last good copy stays, the reason is in
    a log line and `notifyd_tenant_config_fetches_total{outcome="refused"}`."""
    auth_service.docs[TENANT_A] = document(relay_a)
    settings: Settings = settings_factory(
        **env(auth_service, relay_a, 1.0, NOTIFYD_TENANT_CONFIG_MAX_BYTES="4096")
    )
    async with clocked(settings, redis_url, 1.0) as (configs, now, redis, metrics):
        good = await configs.get(TENANT_A)
        shared = Keys(settings.redis_prefix).tenant_config(TENANT_A)
        bad_documents = [
            {**document(relay_a), "default_region": "usa"},
            {**document(relay_a), "smtp": {**document(relay_a)["smtp"], "port": "25x"}},
            {**document(relay_a), "templates": [{**TEMPLATE, "text_body": "{% if %}"}]},
            {**document(relay_a), "templates": [TEMPLATE, TEMPLATE]},
            {**document(relay_a), "smtp": {**document(relay_a)["smtp"], "host": "10.1.2.3"}},
            {**document(relay_a), "unknown": 1},
            {
                **document(relay_a),
                "twilio": {"account_sid": "AC" + "0" * 32, "from_number": "+14155550100"},
            },
        ]
        with caplog.at_level(logging.WARNING, logger="notifyd.tenant_config"):
            for index, bad in enumerate(bad_documents):
                auth_service.docs[TENANT_A] = bad
                await redis.delete(shared)  # no other instance validated a version
                now[0] += 2.0
                assert await configs.get(TENANT_A) is good, bad
                assert caplog.text.count("tenant configuration refused") == index + 1
            for raw in (b"{not json", b"[]", b'{"templates": "' + b"x" * 5000 + b'"}'):
                auth_service.raw[TENANT_A] = raw
                await redis.delete(shared)
                now[0] += 2.0
                assert await configs.get(TENANT_A) is good
        refused = metrics.tenant_config_fetches.labels("refused")._value.get()
        assert refused == len(bad_documents) + 3
        reasons = " ".join(str(getattr(r, "reason", "")) for r in caplog.records)
        assert "default_region" in reasons and "smtp.host" in reasons
        assert "templates[0].text_body" in reasons and "templates[1]" in reasons
        assert "larger than 4096 bytes" in reasons
        assert PASSWORD not in logged(caplog)


async def test_a_failing_source_is_asked_less_and_less_often(
    settings_factory: Any, auth_service: AuthService, relay_a: SmtpSink, redis_url: str
) -> None:
    """Promise: a source that keeps refusing (down, or a document notifyd refuses) is not
    hammered: the pause before the next fetch doubles with each failure in a row, from 5 s
    to at most a minute, for a tenant never fetched and for a stale copy alike; a good answer
    starts over."""
    settings: Settings = settings_factory(**env(auth_service, relay_a, 600.0))
    async with clocked(settings, redis_url, 600.0) as (configs, now, redis, _metrics):

        async def fetches_at(times: list[float], tenant: str) -> list[float]:
            """The times (of `times`) at which a read made the source see a request."""
            seen = []
            for t in times:
                now[0] = t
                # no other instance validated a version (the key's expiry runs in real time)
                await redis.delete(Keys(settings.redis_prefix).tenant_config(tenant))
                before = len(auth_service.statuses(tenant))
                with contextlib.suppress(SourceUnavailable):
                    await configs.get(tenant)
                await asyncio.sleep(0)  # a background refresh is a task: let it start
                await wait_for(lambda: not configs._loading, timeout=5, interval=0.01)
                if len(auth_service.statuses(tenant)) > before:
                    seen.append(t)
            return seen

        auth_service.raw[TENANT_A] = b"{not json"  # refused, never a copy
        ticks = [float(t) for t in range(0, 200)]
        assert await fetches_at(ticks, TENANT_A) == [0, 5, 15, 35, 75, 135, 195]

        # a stale copy: the source down after one good answer
        auth_service.docs[TENANT_B] = {"default_locale": "en"}
        now[0] = 1000.0
        good = await configs.get(TENANT_B)
        auth_service.down = True
        ticks = [1000.0 + t for t in range(480, 700)]
        assert await fetches_at(ticks, TENANT_B) == [1480, 1485, 1495, 1515, 1555, 1615, 1675]
        assert await configs.get(TENANT_B) is good
        auth_service.down = False
        assert await fetches_at([1735.0, 1736.0], TENANT_B) == [1735]
        assert await fetches_at([1736.0 + 481], TENANT_B) == [2217]  # the TTL's pace again


async def test_a_read_that_starts_a_slow_fetch_waits_at_most_the_stale_wait(
    settings_factory: Any, auth_service: AuthService, relay_a: SmtpSink, redis_url: str
) -> None:
    """Promise: a copy idle past its TTL is refreshed by its next read, which waits for the
    fetch 1 s at most: a slower source leaves it on the last good copy (and the metric),
    and the new document is used once it arrives."""
    settings: Settings = settings_factory(
        **env(auth_service, relay_a, 600.0, NOTIFYD_TENANT_CONFIG_TIMEOUT="4")
    )
    auth_service.docs[TENANT_A] = document(relay_a)
    async with clocked(settings, redis_url, 600.0) as (configs, now, redis, metrics):
        good = await configs.get(TENANT_A)
        auth_service.docs[TENANT_A] = document(relay_a, FROM_B)
        auth_service.delay = 2.0
        await redis.delete(Keys(settings.redis_prefix).tenant_config(TENANT_A))
        now[0] = 7000.0  # idle past its TTL and the refresher's horizon
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await configs.get(TENANT_A) is good
        assert loop.time() - started < 1.6  # the 1 s wait, not the source's 2 s
        assert metrics.tenant_config_stale._value.get() == 1
        await wait_for(lambda: not configs._loading, timeout=5, interval=0.05)
        fresh = await configs.get(TENANT_A)
        assert fresh.smtp is not None and fresh.smtp.from_email == FROM_B


async def test_copies_in_use_are_refreshed_before_they_expire_and_idle_ones_are_not(
    settings_factory: Any, auth_service: AuthService, relay_a: SmtpSink, redis_url: str
) -> None:
    """Promise: a tenant's copy read lately is revalidated in the background from 80 % of
    the TTL without any read (a rare sender never waits for the source); a copy idle for
    ten TTLs is left to its next read; the source sees no more than the refresh."""
    settings: Settings = settings_factory(**env(auth_service, relay_a, 600.0))
    auth_service.docs[TENANT_A] = document(relay_a)
    async with clocked(settings, redis_url, 600.0) as (configs, now, redis, _metrics):

        async def refresh_at(t: float) -> int:
            now[0] = t
            await redis.delete(Keys(settings.redis_prefix).tenant_config(TENANT_A))
            started = configs.refresh_due()
            await wait_for(lambda: not configs._loading, timeout=5, interval=0.01)
            return started

        good = await configs.get(TENANT_A)  # read at 0
        assert auth_service.statuses(TENANT_A) == [200]
        assert await refresh_at(479.0) == 0
        assert await refresh_at(480.0) == 1
        assert auth_service.statuses(TENANT_A) == [200, 304]
        assert await refresh_at(481.0) == 0  # fresh again until 960
        assert await refresh_at(960.0) == 1
        now[0] = 1000.0
        assert await configs.get(TENANT_A) is good  # no fetch: the copy was fresh
        assert auth_service.statuses(TENANT_A) == [200, 304, 304]
        assert await refresh_at(1440.0) == 1  # read at 1000: still in use
        assert await refresh_at(7001.0) == 0  # idle for ten TTLs: left to its next read
        assert auth_service.statuses(TENANT_A) == [200, 304, 304, 304]


async def test_the_daemon_keeps_a_tenants_copy_fresh_between_sends(
    daemon_factory: DaemonFactory, auth_service: AuthService, relay_a: SmtpSink
) -> None:
    """Promise: after one send, the daemon revalidates the tenant's copy at the source about
    once per TTL with no further send (the refresher actor), with If-None-Match."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(**env(auth_service, relay_a, 1.0))
    async with Api(daemon) as api:
        await send(api)
    await arrived(relay_a, 1)
    seen = len(auth_service.requests)
    await asyncio.sleep(3.5)
    later = auth_service.requests[seen:]
    assert 2 <= len(later) <= 5, later  # one per TTL (1 s), not one per refresher tick
    assert all(etag is not None and status == 304 for _, etag, _, status in later), later


async def test_secrets_from_the_source_never_reach_a_log(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    caplog: pytest.LogCaptureFixture,
    redis: Redis,
) -> None:
    """Promise: the relay password and the bearer token are held in memory only: not in any
    log line (fetch, refusal, send), not in Redis, not in the settings API's answer."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(**env(auth_service, smtp_sink, 0.5))
    with caplog.at_level(logging.DEBUG):
        async with Api(daemon) as api:
            await send(api)
            await arrived(relay_a, 1)
            _, shown, _ = await api.get(
                "/tenants/current/settings/", tenant=TENANT_A, user="admin", role="admin"
            )
            bad = document(relay_a)
            bad["smtp"]["password"] = PASSWORD + "\n"
            auth_service.docs[TENANT_A] = bad
            await wait_for(lambda: _refused(daemon), timeout=5, interval=0.1)
            await send(api)
            await arrived(relay_a, 2)
    assert "tenant configuration refused" in caplog.text
    for secret in (PASSWORD, BEARER):
        assert secret not in logged(caplog)
        assert secret not in orjson.dumps(shown).decode()
        for key in await redis.keys("*"):
            if await redis.type(key) == b"string":
                assert secret.encode() not in (await redis.get(key) or b"")


async def test_an_ingested_event_is_rendered_from_the_sources_template(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
    redis: Redis,
) -> None:
    """Promise: every acceptance path reads the source (not only REST): a domain event on
    the Redis stream is rendered from the source's template and sent through its relay."""
    auth_service.docs[TENANT_A] = document(relay_a)
    await daemon_factory(**env(auth_service, smtp_sink))
    event = {
        "event_id": "evt-32",
        "tenant_id": TENANT_A,
        "type": "interview.scheduled",
        "template_key": "interviewScheduling",
        "context": CONTEXT,
        "recipients": [{"user_id": "cand-1", "email": "john.doe@example.com"}],
        "channels": ["email"],
    }
    await redis.xadd("notifyd:events", {"event": orjson.dumps(event)})
    [received] = await arrived(relay_a, 1)
    assert received.mail_from == FROM_A
    assert "Senior Developer at Lumina Care" in str(received.message["Subject"])


# --- the settings API: sourced fields shown and read-only ---------------------------------------


async def test_sourced_fields_are_shown_and_read_only(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
) -> None:
    """Promise: GET /tenants/current/settings/ and GET /templates/ say which values come from
    the source; a PUT of a sourced field answers a problem+json naming it and stores nothing;
    a field the source omits is still the tenant's to set."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(
        **env(auth_service, smtp_sink), NOTIFYD_TENANT_SECRET_KEY="tenant-secret-key-for-tests"
    )
    admin = {"tenant": TENANT_A, "user": "admin", "role": "admin"}
    async with Api(daemon) as api:
        status, shown, _ = await api.get("/tenants/current/settings/", **admin)
        assert status == 200, shown
        assert shown["sourced"] == ["default_locale", "smtp", "templates"]
        assert shown["smtp"]["from_email"] == FROM_A
        assert shown["smtp"]["password_set"] is True
        status, problem, headers = await api.request(
            "PUT",
            "/tenants/current/settings/",
            json={"smtp": {"host": "smtp.example.com", "port": 587, "from_email": FROM_B}},
            **admin,
        )
        assert status == 409, problem
        assert headers["Content-Type"].startswith("application/problem+json")
        assert problem["errors"][0]["field"] == "smtp"
        status, body, _ = await api.request(
            "PUT", "/tenants/current/settings/", json={"default_region": "GB"}, **admin
        )
        assert status == 200, body
        assert body["default_region"] == "GB" and body["smtp"]["from_email"] == FROM_A
        status, listed, _ = await api.get("/templates/", **admin)
        assert status == 200, listed
        [sourced] = [t for t in listed if t["template_key"] == "interviewScheduling"]
        assert sourced["source"] == "tenant_config"
        status, one, _ = await api.get("/templates/interviewScheduling/email/", **admin)
        assert (status, one["source"], one["subject"]) == (
            200,
            "tenant_config",
            TEMPLATE["subject"],
        )
        status, problem, _ = await api.request(
            "PUT",
            "/templates/interviewScheduling/email/",
            json={"text_body": "mine"},
            **admin,
        )
        assert status == 409, problem


async def test_the_twilio_account_and_region_from_the_source_carry_that_tenants_sms(
    daemon_factory: DaemonFactory, auth_service: AuthService, smtp_sink: SmtpSink
) -> None:
    """Promise: the source's Twilio account and default region are the tenant's for SMS (its
    own circuit, its own credentials); another tenant keeps the platform's settings."""
    sid = "AC" + "0123456789abcdef" * 2
    auth_service.docs[TENANT_A] = {
        "twilio": {"account_sid": sid, "auth_token": "t" * 32, "from_number": "+441632960961"},
        "default_region": "GB",
    }
    daemon = await daemon_factory(**env(auth_service, smtp_sink))
    assert daemon.pipeline is not None
    sms = daemon.pipeline.providers[1]
    assert sms.channel == "sms"
    route = await sms.route(TENANT_A)
    assert route is not None and route.label == TENANT_A
    tenant = await daemon.pipeline.tenant_settings.get(TENANT_A)
    assert tenant.twilio is not None and tenant.twilio.account_sid == sid
    assert region_for(tenant, daemon.settings) == "GB"
    other = await daemon.pipeline.tenant_settings.get(TENANT_B)
    assert other.twilio is None and region_for(other, daemon.settings) == "US"


async def test_without_a_token_notifyd_signs_a_short_lived_jwt_per_tenant(
    daemon_factory: DaemonFactory,
    auth_service: AuthService,
    smtp_sink: SmtpSink,
    relay_a: SmtpSink,
) -> None:
    """Promise: with no NOTIFYD_TENANT_CONFIG_TOKEN and a JWT_SECRET the auth service shares,
    each fetch carries a JWT notifyd signs for that tenant alone, valid a minute."""
    auth_service.docs[TENANT_A] = document(relay_a)
    daemon = await daemon_factory(
        **{**env(auth_service, smtp_sink), "NOTIFYD_TENANT_CONFIG_TOKEN": ""}
    )
    assert daemon.settings.jwt_secret
    auth_service.jwt_secret = daemon.settings.jwt_secret
    async with Api(daemon) as api:
        await send(api)
        await arrived(relay_a, 1)
    [claims] = auth_service.jwt_claims
    assert (claims["tenant_id"], claims["user_id"], claims["role"]) == (
        TENANT_A,
        "notifyd",
        "service",
    )
    assert claims["exp"] - claims["iat"] == 60


def test_the_tenant_id_is_percent_encoded_in_the_url() -> None:
    """Promise: an opaque tenant id cannot change the source's path or query."""
    url = document_url("http://auth/t/{tenant_id}/cfg", "a/b?c#d e")
    assert url == "http://auth/t/a%2Fb%3Fc%23d%20e/cfg"


def test_source_unavailable_is_not_a_template_error() -> None:
    """The error a sender turns into a retry is its own type (never matched by its text)."""
    assert not issubclass(SourceUnavailable, ValueError)


def test_the_document_schema_is_served_in_the_openapi_document() -> None:
    """Promise: the schema an auth service implements is in /openapi.json, generated from
    the very model notifyd validates the document with (limits that are settings included)."""
    document = build_document(Settings(notification_max_length=1234))
    schemas = document["components"]["schemas"]
    config = schemas["TenantConfigDocument"]
    assert set(config["properties"]) == {
        "smtp",
        "twilio",
        "default_region",
        "default_locale",
        "templates",
    }
    assert config["additionalProperties"] is False
    templates = config["properties"]["templates"]["anyOf"][0]
    assert templates["maxItems"] == 500
    item = schemas[templates["items"]["$ref"].rsplit("/", 1)[1]]
    assert item["required"] == ["template_key", "channel", "text_body"]
    assert item["properties"]["text_body"]["maxLength"] == 1234
    assert "TenantConfigDocument" in document["info"]["description"]
