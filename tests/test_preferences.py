"""Per-user channel and category preferences: what they suppress, and the REST routes.

Promises checked: an opted-out channel or category is suppressed with a reason, anything not
mentioned is delivered, and `critical` always is; GET/PUT /preferences/ (and /api/) read and
replace the caller's own preferences, for any role, with an audit row; invalid input names the
field and changes nothing; one user's preferences are invisible to another user and to the same
user id in another tenant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from notifyd.preferences import Preferences, suppression_reason
from notifyd.settings import Settings
from notifyd.store import preferences as store
from notifyd.store.pool import close_pool, create_pool
from tests.helpers import Api

PATH = "/preferences/"
PROBLEM_JSON = "application/problem+json"
EMPTY: dict[str, dict[str, bool]] = {"channels": {}, "categories": {}}

OPTED_OUT = Preferences(
    channels={"email": False, "sms": True},
    categories={"marketing": False, "interview": True},
)


@pytest.mark.parametrize(
    ("prefs", "channel", "category", "critical", "reason"),
    [
        (None, "email", "marketing", False, None),
        (Preferences(), "sms", "marketing", False, None),
        (OPTED_OUT, "email", None, False, "recipient opted out of email"),
        (OPTED_OUT, "email", "interview", False, "recipient opted out of email"),
        (OPTED_OUT, "email", None, True, None),
        (OPTED_OUT, "sms", None, False, None),
        (OPTED_OUT, "in_app", None, False, None),
        (OPTED_OUT, "sms", "marketing", False, "recipient opted out of category 'marketing'"),
        (OPTED_OUT, "in_app", "marketing", True, None),
        (OPTED_OUT, "sms", "interview", False, None),
        (OPTED_OUT, "sms", "digest", False, None),
        (OPTED_OUT, "sms", "Marketing", False, None),
    ],
)
def test_suppression_reason(
    prefs: Preferences | None, channel: str, category: str | None, critical: bool, reason: Any
) -> None:
    assert (
        suppression_reason(prefs, channel=channel, category=category, critical=critical) == reason
    )


async def put(
    api: Api, body: Any, *, tenant: str = "TEN-0001", user: str = "user-1", role: str = "user"
) -> tuple[int, Any, Any]:
    return await api.request("PUT", PATH, json=body, tenant=tenant, user=user, role=role)


async def test_round_trip_replaces_and_audits(api: Api) -> None:
    status, body, _ = await api.get(PATH)
    assert (status, body) == (200, EMPTY)
    wanted = {
        "channels": {"email": False, "sms": True},
        "categories": {"marketing": False, "jobs.alerts:weekly-1": True},
    }
    status, body, _ = await put(api, wanted)
    assert (status, body) == (200, wanted)
    for path in (PATH, "/api" + PATH):
        status, body, _ = await api.get(path)
        assert (status, body) == (200, wanted)

    # PUT replaces: what is left out is opted back in
    status, body, _ = await api.request("PUT", "/api" + PATH, json={"channels": {"in_app": False}})
    assert (status, body) == (200, {"channels": {"in_app": False}, "categories": {}})
    status, body, _ = await put(api, {})
    assert (status, body) == (200, EMPTY)

    status, rows, _ = await api.get("/audit/?action=preferences.update", role="admin")
    assert status == 200
    assert len(rows) == 3
    assert {r["user_id"] for r in rows} == {"user-1"}
    assert rows[-1]["details"]["channels"] == {"email": False, "sms": True}


async def test_any_role_manages_its_own(api: Api) -> None:
    for role in ("service", "admin"):
        wanted = {"channels": {"sms": False}, "categories": {role: False}}
        status, body, _ = await put(api, wanted, user=f"{role}-1", role=role)
        assert (status, body) == (200, wanted)
        status, body, _ = await api.get(PATH, user=f"{role}-1", role=role)
        assert body == wanted


async def test_validation_names_the_field_and_changes_nothing(api: Api) -> None:
    assert (await put(api, {"channels": {"email": False}}))[0] == 200
    cases: list[tuple[Any, set[str]]] = [
        ({"channels": {"push": False}}, {"channels.push"}),
        ({"channels": {"email": "no"}}, {"channels.email"}),
        ({"channels": {"email": None}}, {"channels.email"}),
        ({"channels": ["email"]}, {"channels"}),
        ({"categories": {"bad name": False}}, {"categories.bad name"}),
        ({"categories": {"x" * 65: False}}, {"categories." + "x" * 64}),
        ({"categories": {"": False}}, {"categories."}),
        ({"categories": {"ok": 0}}, {"categories.ok"}),
        ({"categories": {f"c{i}": False for i in range(101)}}, {"categories"}),
        ({"channel": {}}, {"channel"}),
        (
            {"channels": {"fax": True, "sms": 1}, "categories": {"a b": True}},
            {"channels.fax", "channels.sms", "categories.a b"},
        ),
    ]
    for body, fields in cases:
        status, problem, headers = await put(api, body)
        assert status == 422, body
        assert headers["Content-Type"].startswith(PROBLEM_JSON)
        assert {e["field"] for e in problem["errors"]} == fields, body
    status, problem, _ = await api.request(
        "PUT", PATH, data="[]", headers={"Content-Type": "application/json"}
    )
    assert status == 400, problem
    many = {f"c{i}": False for i in range(100)}
    status, body, _ = await put(api, {"categories": many})
    assert status == 200 and body["categories"] == many
    status, body, _ = await put(api, {"channels": {"email": False}})
    status, body, _ = await api.get(PATH)
    assert body == {"channels": {"email": False}, "categories": {}}


@pytest.fixture
async def pool(settings_factory: Callable[..., Settings]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_factory())
    try:
        yield pool
    finally:
        await close_pool(pool)


async def test_users_and_tenants_are_isolated(api: Api, pool: asyncpg.Pool) -> None:
    mine = {"channels": {"email": False}, "categories": {"marketing": False}}
    assert (await put(api, mine, tenant="TEN-0001", user="user-1"))[0] == 200
    assert (await api.get(PATH, tenant="TEN-0001", user="user-2"))[1] == EMPTY
    assert (await api.get(PATH, tenant="TEN-0002", user="user-1"))[1] == EMPTY
    other = {"channels": {"sms": False}, "categories": {}}
    assert (await put(api, other, tenant="TEN-0002", user="user-1"))[0] == 200
    assert (await api.get(PATH, tenant="TEN-0001", user="user-1"))[1] == mine

    loaded = await store.load(pool, "TEN-0001", "user-1")
    assert loaded == Preferences(channels={"email": False}, categories={"marketing": False})
    assert await store.load(pool, "TEN-0001", "user-2") is None
    assert suppression_reason(loaded, channel="email", category=None, critical=False)
    other_loaded = await store.load(pool, "TEN-0002", "user-1")
    assert suppression_reason(other_loaded, channel="email", category=None, critical=False) is None


async def test_store_save_replaces(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await store.save(conn, "TEN-0001", "u", OPTED_OUT)
        assert await store.load(conn, "TEN-0001", "u") == OPTED_OUT
        await store.save(conn, "TEN-0001", "u", Preferences())
        assert await store.load(conn, "TEN-0001", "u") == Preferences()


async def test_needs_a_token(api: Api) -> None:
    status, _, headers = await api.get(PATH, auth=False)
    assert status == 401
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
