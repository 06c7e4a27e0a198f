"""Per-tenant delivery settings: secrets sealed at rest, never shown, admins only, per tenant.

Promises checked: SecretBox round-trips, rotates keys and names a wrong key clearly; the
PostgreSQL row never holds a plaintext password or token; GET /tenants/current/settings/ never
returns one; PUT without `password` keeps the stored one; `user` and `service` tokens get 403;
one tenant's settings are invisible to another; without NOTIFYD_TENANT_SECRET_KEY a secret is
refused with 409 and nothing is stored; every invalid field is named; tenants without their own
settings fall back to the global EMAIL_* / TWILIO_* / region / locale settings; the senders'
cache serves within its TTL, reloads after it, and `invalidate` takes effect at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from notifyd.secretbox import SecretBox, SecretError
from notifyd.settings import Settings
from notifyd.store import tenants as store
from notifyd.store.pool import close_pool, create_pool
from notifyd.store.tenants import (
    SmtpConfig,
    TenantSettings,
    TenantSettingsCache,
    TwilioConfig,
    locale_for,
    region_for,
    smtp_for,
    twilio_for,
)
from tests.conftest import DaemonFactory
from tests.helpers import Api, make_settings

KEY = "tenant-secret-key-for-tests"
PASSWORD = "s3cret-smtp-pässword"
TOKEN = "f" * 32
SID = "AC" + "0123456789abcdef" * 2
TENANT = "TEN-0001"
PATH = "/tenants/current/settings/"
PROBLEM_JSON = "application/problem+json"

SMTP = {
    "host": "smtp.example.com",
    "port": 587,
    "username": "mailer",
    "password": PASSWORD,
    "use_tls": True,
    "use_ssl": False,
    "from_email": "jobs@example.com",
}
TWILIO = {"account_sid": SID, "auth_token": TOKEN, "from_number": "+14155550100"}


@pytest.fixture
async def keyed_api(daemon_factory: DaemonFactory) -> AsyncIterator[Api]:
    daemon = await daemon_factory(NOTIFYD_TENANT_SECRET_KEY=KEY)
    async with Api(daemon) as client:
        yield client


async def put(api: Api, body: Any, *, tenant: str = TENANT, role: str = "admin") -> Any:
    return await api.request("PUT", PATH, json=body, tenant=tenant, user="admin-1", role=role)


async def get(api: Api, *, tenant: str = TENANT, role: str = "admin", path: str = PATH) -> Any:
    return await api.get(path, tenant=tenant, user="admin-1", role=role)


# -- SecretBox ---------------------------------------------------------------------------------


def test_secretbox_round_trip_and_ciphertext_hides_plaintext() -> None:
    box = SecretBox([KEY])
    sealed = box.encrypt(PASSWORD)
    assert PASSWORD not in sealed
    assert box.encrypt(PASSWORD) != sealed  # random IV: equal secrets do not look equal
    assert box.decrypt(sealed) == PASSWORD
    assert KEY not in repr(box)


def test_secretbox_rotation_first_key_seals_every_key_opens() -> None:
    old = SecretBox(["old-key"])
    rotated = SecretBox(["new-key", "old-key"])
    sealed_old = old.encrypt("a")
    sealed_new = rotated.encrypt("b")
    assert rotated.decrypt(sealed_old) == "a"
    assert rotated.decrypt(sealed_new) == "b"
    assert SecretBox(["new-key"]).decrypt(sealed_new) == "b"
    with pytest.raises(SecretError):
        old.decrypt(sealed_new)  # sealed with the new key, which the old box does not hold


def test_secretbox_wrong_key_or_garbage_is_a_clear_secret_error() -> None:
    sealed = SecretBox(["right"]).encrypt(PASSWORD)
    with pytest.raises(SecretError, match="NOTIFYD_TENANT_SECRET_KEY"):
        SecretBox(["wrong"]).decrypt(sealed)
    with pytest.raises(SecretError):
        SecretBox(["right"]).decrypt("not a token")


def test_secretbox_from_settings() -> None:
    def settings(key: str) -> Settings:
        return make_settings("postgresql://x@h/db", "redis://h", NOTIFYD_TENANT_SECRET_KEY=key)

    assert SecretBox.from_settings(settings("")) is None
    assert SecretBox.from_settings(settings(" , ")) is None
    rotated = SecretBox.from_settings(settings("new, old"))
    assert rotated is not None
    assert rotated.decrypt(SecretBox(["old"]).encrypt("x")) == "x"


# -- REST: secrets stay sealed and hidden --------------------------------------------------------


async def test_put_stores_secrets_encrypted_and_get_never_returns_them(
    keyed_api: Api, db: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    status, body, _ = await put(
        keyed_api,
        {
            "smtp": SMTP,
            "twilio": TWILIO,
            "default_region": "GB",
            "default_locale": "en",
            "default_timezone": "Europe/London",
        },
    )
    assert status == 200, body
    expected = {
        "smtp": {k: v for k, v in SMTP.items() if k != "password"} | {"password_set": True},
        "twilio": {"account_sid": SID, "from_number": "+14155550100", "auth_token_set": True},
        "default_region": "GB",
        "default_locale": "en",
        "default_timezone": "Europe/London",
        "sourced": [],  # no tenant configuration source (tests/test_tenant_config.py)
    }
    assert body == expected
    for path in (PATH, "/api" + PATH):
        status, shown, _ = await get(keyed_api, path=path)
        assert status == 200
        assert shown == expected

    raw = await db.fetchval("SELECT settings::text FROM tenants WHERE tenant_id = $1", TENANT)
    assert PASSWORD not in raw
    assert TOKEN not in raw
    assert "password_enc" in raw and "auth_token_enc" in raw

    loaded = await store.load(pool, TENANT, SecretBox([KEY]))
    assert loaded.smtp is not None and loaded.smtp.password == PASSWORD
    assert loaded.twilio is not None and loaded.twilio.auth_token == TOKEN
    assert PASSWORD not in repr(loaded) and TOKEN not in repr(loaded)
    with pytest.raises(SecretError):
        await store.load(pool, TENANT, SecretBox(["another-key"]))

    status, rows, _ = await keyed_api.get(
        "/audit/?action=tenant.settings_update", user="admin-1", role="admin"
    )
    assert status == 200 and len(rows) == 1
    assert PASSWORD not in str(rows) and TOKEN not in str(rows)
    assert rows[0]["details"]["smtp"]["password"] == "changed"


async def test_put_without_password_keeps_it_and_null_falls_back(
    keyed_api: Api, pool: asyncpg.Pool
) -> None:
    assert (await put(keyed_api, {"smtp": SMTP, "twilio": TWILIO}))[0] == 200
    status, shown, _ = await get(keyed_api)
    # send the GET body back with a new host: no password, read-only flags included
    changed = {"smtp": {**shown["smtp"], "host": "mail2.example.com"}}
    status, body, _ = await put(keyed_api, changed)
    assert status == 200, body
    assert body["smtp"]["host"] == "mail2.example.com"
    assert body["smtp"]["password_set"] is True
    assert body["twilio"]["auth_token_set"] is True  # a section left out is kept
    loaded = await store.load(pool, TENANT, SecretBox([KEY]))
    assert loaded.smtp is not None
    assert (loaded.smtp.host, loaded.smtp.password) == ("mail2.example.com", PASSWORD)

    twilio = {"account_sid": SID, "from_number": "4155550100"}
    status, body, _ = await put(keyed_api, {"twilio": twilio})
    assert status == 200, body
    loaded = await store.load(pool, TENANT, SecretBox([KEY]))
    assert loaded.twilio == TwilioConfig(SID, TOKEN, "4155550100")

    status, body, _ = await put(keyed_api, {"smtp": {**SMTP, "password": ""}})
    assert status == 200 and body["smtp"]["password_set"] is False

    status, body, _ = await put(keyed_api, {"smtp": None, "twilio": None, "default_region": None})
    assert status == 200
    assert body == {
        "smtp": None,
        "twilio": None,
        "default_region": None,
        "default_locale": None,
        "default_timezone": None,
        "sourced": [],
    }
    assert await store.load(pool, TENANT, SecretBox([KEY])) == TenantSettings()


async def test_new_twilio_account_needs_a_token(keyed_api: Api) -> None:
    status, body, _ = await put(keyed_api, {"twilio": {"account_sid": SID, "from_number": "+1415"}})
    assert status == 422
    assert [e["field"] for e in body["errors"]] == ["twilio.from_number"]
    status, body, headers = await put(
        keyed_api, {"twilio": {"account_sid": SID, "from_number": "+14155550100"}}
    )
    assert status == 422, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert [e["field"] for e in body["errors"]] == ["twilio.auth_token"]


async def test_only_admins(keyed_api: Api, db: asyncpg.Connection) -> None:
    for role in ("user", "service"):
        for path in (PATH, "/api" + PATH):
            status, _, headers = await get(keyed_api, role=role, path=path)
            assert status == 403
            assert headers["Content-Type"].startswith(PROBLEM_JSON)
        status, _, _ = await put(keyed_api, {"smtp": SMTP}, role=role)
        assert status == 403
    assert await db.fetchval("SELECT count(*) FROM tenants") == 0


async def test_tenants_never_see_each_other(keyed_api: Api) -> None:
    assert (await put(keyed_api, {"smtp": SMTP, "default_region": "GB"}))[0] == 200
    status, body, _ = await get(keyed_api, tenant="TEN-0002")
    assert status == 200
    assert body == {
        "smtp": None,
        "twilio": None,
        "default_region": None,
        "default_locale": None,
        "default_timezone": None,
        "sourced": [],
    }
    assert (await put(keyed_api, {"default_region": "DE"}, tenant="TEN-0002"))[0] == 200
    _, mine, _ = await get(keyed_api)
    assert mine["default_region"] == "GB" and mine["smtp"]["host"] == "smtp.example.com"


async def test_secret_without_key_is_refused_with_409(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory()  # NOTIFYD_TENANT_SECRET_KEY unset
    async with Api(daemon) as api:
        for body in ({"smtp": SMTP}, {"twilio": TWILIO}):
            status, problem, headers = await put(api, body)
            assert status == 409, problem
            assert headers["Content-Type"].startswith(PROBLEM_JSON)
            assert "NOTIFYD_TENANT_SECRET_KEY" in problem["detail"]
        assert await db.fetchval("SELECT count(*) FROM tenants") == 0
        # a server without AUTH needs no secret, so it can be stored without the key
        no_auth = {k: v for k, v in SMTP.items() if k not in ("password", "username")}
        status, body, _ = await put(api, {"smtp": no_auth})
        assert status == 200, body
        assert body["smtp"]["password_set"] is False


async def test_every_invalid_field_is_named(keyed_api: Api, db: asyncpg.Connection) -> None:
    body = {
        "smtp": {
            "host": "bad host\r\nX-Injected: 1",
            "port": 70000,
            "username": "a\nb",
            "use_tls": True,
            "use_ssl": True,
            "from_email": "not-an-address",
            "extra": 1,
        },
        "twilio": {"account_sid": "AC123", "auth_token": TOKEN, "from_number": "call me"},
        "default_region": "gb",
        "default_locale": "english",
        "tenant_id": "TEN-0002",
    }
    status, problem, headers = await put(keyed_api, body)
    assert status == 422
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    fields = {e["field"] for e in problem["errors"]}
    assert fields == {
        "smtp.host",
        "smtp.port",
        "smtp.username",
        "smtp.use_ssl",
        "smtp.from_email",
        "smtp.extra",
        "twilio.account_sid",
        "twilio.from_number",
        "default_region",
        "default_locale",
        "tenant_id",
    }
    assert await db.fetchval("SELECT count(*) FROM tenants") == 0


# each body has exactly one fault (one daemon for all of them: a daemon per case is slow)
SINGLE_FAULTS: list[tuple[dict[str, Any], str]] = [
    ({"smtp": "smtp.example.com"}, "smtp"),
    ({"smtp": {**SMTP, "port": "587"}}, "smtp.port"),
    ({"smtp": {**SMTP, "port": True}}, "smtp.port"),
    ({"smtp": {**SMTP, "port": 0}}, "smtp.port"),
    ({"smtp": {k: v for k, v in SMTP.items() if k != "host"}}, "smtp.host"),
    ({"smtp": {**SMTP, "password": "p\r\nw"}}, "smtp.password"),
    ({"smtp": {**SMTP, "from_email": "a@example.com\r\nBcc: x@evil.com"}}, "smtp.from_email"),
    ({"twilio": {**TWILIO, "account_sid": "AC" + "g" * 32}}, "twilio.account_sid"),
    ({"twilio": {**TWILIO, "auth_token": ""}}, "twilio.auth_token"),
    ({"default_locale": "portuguese-brazil"}, "default_locale"),
    ({"default_timezone": "Mars/Olympus"}, "default_timezone"),
]


async def test_single_invalid_field(keyed_api: Api) -> None:
    for body, field in SINGLE_FAULTS:
        status, problem, _ = await put(keyed_api, body)
        assert status == 422, (body, problem)
        assert [e["field"] for e in problem["errors"]] == [field], body


async def test_valid_national_number_and_locale_forms(keyed_api: Api) -> None:
    body = {
        "twilio": {**TWILIO, "from_number": "(756) 899-2589"},
        "default_locale": "pt-BR",
        # an IP literal (a public one: loopback is the egress policy's, tests/test_egress.py)
        "smtp": {**SMTP, "host": "93.184.216.34", "port": 465, "use_tls": False, "use_ssl": True},
    }
    status, shown, _ = await put(keyed_api, body)
    assert status == 200, shown
    assert shown["default_locale"] == "pt-BR"
    assert shown["smtp"]["use_ssl"] is True
    status, shown, _ = await put(keyed_api, {"default_locale": "pt_br"})
    assert (status, shown["default_locale"]) == (200, "pt-BR")  # one spelling is stored


# -- fallbacks to the global settings -----------------------------------------------------------


def global_settings(**env: str) -> Settings:
    return make_settings("postgresql://x@h/db", "redis://h", **env)


def test_smtp_falls_back_to_global_email_settings() -> None:
    settings = global_settings(
        EMAIL_HOST="mail.global",
        EMAIL_PORT="2525",
        EMAIL_HOST_USER="global-user",
        EMAIL_HOST_PASSWORD="global-pw",
        EMAIL_USE_SSL="true",
        EMAIL_FROM="noreply@global.example",
    )
    assert smtp_for(TenantSettings(), settings) == SmtpConfig(
        host="mail.global",
        port=2525,
        username="global-user",
        password="global-pw",
        use_tls=False,
        use_ssl=True,
        from_email="noreply@global.example",
        operator_relay=True,  # exempt from the egress policy; a tenant's own never is
    )
    own = SmtpConfig("smtp.tenant", 587, "u", "p", True, False, "t@tenant.example")
    assert smtp_for(TenantSettings(smtp=own), settings) is own
    assert "global-pw" not in repr(smtp_for(TenantSettings(), settings))


def test_twilio_falls_back_to_global_only_when_configured() -> None:
    assert twilio_for(TenantSettings(), global_settings()) is None
    assert twilio_for(TenantSettings(), global_settings(TWILIO_ACCOUNT_SID=SID)) is None
    configured = global_settings(
        TWILIO_ACCOUNT_SID=SID, TWILIO_AUTH_TOKEN="tok", TWILIO_PHONE="7568992589"
    )
    assert twilio_for(TenantSettings(), configured) == TwilioConfig(SID, "tok", "7568992589")
    own = TwilioConfig("AC" + "1" * 32, "own", "+442071838750")
    assert twilio_for(TenantSettings(twilio=own), configured) is own


def test_region_and_locale_fall_back_to_global() -> None:
    settings = global_settings(NOTIFYD_DEFAULT_REGION="IN", NOTIFYD_DEFAULT_LOCALE="hi")
    assert region_for(TenantSettings(), settings) == "IN"
    assert locale_for(TenantSettings(), settings) == "hi"
    tenant = TenantSettings(default_region="BR", default_locale="pt-BR")
    assert region_for(tenant, settings) == "BR"
    assert locale_for(tenant, settings) == "pt-BR"


# -- the senders' cache -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingPool:
    """The real pool, counting the loads that reach PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.loads = 0

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.loads += 1
        await asyncio.sleep(0)  # let concurrent callers pile up behind the one load
        return await self.pool.fetchval(query, *args)


@pytest.fixture
async def pool(settings_factory: Callable[..., Settings]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_factory())
    try:
        yield pool
    finally:
        await close_pool(pool)


async def save(pool: asyncpg.Pool, tenant: str, settings: TenantSettings, box: SecretBox) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await store.save(conn, tenant, settings, box)


async def test_cache_serves_within_ttl_reloads_after_and_invalidates(pool: asyncpg.Pool) -> None:
    box = SecretBox([KEY])
    counting = CountingPool(pool)
    clock = Clock()
    cache = TenantSettingsCache(counting, box, ttl=30.0, clock=clock)  # type: ignore[arg-type]
    smtp = SmtpConfig("smtp.a", 25, "", PASSWORD, False, False, "a@a.example")
    await save(pool, "TEN-A", TenantSettings(smtp=smtp), box)

    results = await asyncio.gather(*(cache.get("TEN-A") for _ in range(20)))
    assert all(r.smtp == smtp for r in results)
    assert counting.loads == 1  # one load in flight per tenant

    await save(pool, "TEN-A", TenantSettings(default_region="GB"), box)
    clock.now += 29
    assert (await cache.get("TEN-A")).smtp == smtp  # still within the TTL
    assert counting.loads == 1
    clock.now += 2
    assert await cache.get("TEN-A") == TenantSettings(default_region="GB")
    assert counting.loads == 2

    await save(pool, "TEN-A", TenantSettings(default_region="FR"), box)
    cache.invalidate("TEN-A")
    assert (await cache.get("TEN-A")).default_region == "FR"
    assert counting.loads == 3

    assert await cache.get("TEN-UNKNOWN") == TenantSettings()
    assert counting.loads == 4


async def test_cache_does_not_keep_failures(pool: asyncpg.Pool) -> None:
    box = SecretBox([KEY])
    smtp = SmtpConfig("smtp.a", 25, "", PASSWORD, False, False, "a@a.example")
    await save(pool, "TEN-A", TenantSettings(smtp=smtp), box)
    wrong = TenantSettingsCache(pool, SecretBox(["wrong-key"]))
    for _ in range(2):
        with pytest.raises(SecretError):
            await wrong.get("TEN-A")
    assert (await TenantSettingsCache(pool, box).get("TEN-A")).smtp == smtp


async def test_put_through_daemon_is_seen_by_a_fresh_cache(keyed_api: Api) -> None:
    """The HTTP write and the senders' read agree on the stored format."""
    assert (await put(keyed_api, {"smtp": SMTP, "twilio": TWILIO}))[0] == 200
    pool = await create_pool(keyed_api.daemon.settings)
    try:
        loaded = await TenantSettingsCache(pool, SecretBox([KEY])).get(TENANT)
    finally:
        await close_pool(pool)
    assert loaded.smtp == SmtpConfig(
        "smtp.example.com", 587, "mailer", PASSWORD, True, False, "jobs@example.com"
    )
    assert loaded.twilio == TwilioConfig(SID, TOKEN, "+14155550100")
