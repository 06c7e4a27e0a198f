"""The suppression list (issue 29): what puts an address on it, what it stops, its routes.

Promises checked (each test names its own): an address on the list ends a send `suppressed`
with the reason and no relay or Twilio call; a dead address (hard bounce, a relay's refusal of
the mailbox) and an SMS opt-out stop even `critical` sends, a category's entry (complaint,
unsubscribe) stops that category only and not critical ones; a relay's 550-class refusal at
RCPT TO and Twilio's 21610 (at send time, or in a status callback, or a STOP reported as
`OptOutType`) put the address on the list; `GET /suppressions/` (admin, paged) and
`DELETE /suppressions/{channel}/{address}/` (admin, audited); every value is bounded with a
problem naming the field; tenants never see or remove each other's entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from notifyd.settings import Settings
from notifyd.store import suppressions as store
from notifyd.store.pool import close_pool, create_pool
from notifyd.suppressions import listed_reason
from tests.conftest import DaemonFactory
from tests.helpers import Api
from tests.smtp_sink import SmtpSink
from tests.test_pipeline_email import row, send, start, wait_status

PATH = "/suppressions/"
PROBLEM_JSON = "application/problem+json"
E164 = "+917568992589"  # SEED_SMS's recipient in region IN


# --- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "category", "critical", "suppressed"),
    [
        (None, None, False, False),
        ("hard_bounce", "", False, True),
        ("hard_bounce", "", True, True),
        ("smtp_refused", "", True, True),
        ("sms_opt_out", "", True, True),
        ("complaint", "marketing", False, True),
        ("complaint", "marketing", True, False),
        ("unsubscribe", "digest", False, True),
        ("unsubscribe", "digest", True, False),
    ],
)
def test_which_entries_stop_which_sends(
    reason: str | None, category: str, critical: bool, suppressed: bool
) -> None:
    """Promise: a dead address or an SMS opt-out stops even critical sends; a category's
    complaint or unsubscribe is bypassed by critical as preferences are."""
    said = listed_reason(reason, category, critical=critical)
    assert (said is not None) is suppressed
    if said is not None:
        assert reason is not None and reason in said
        assert (category in said) if category else "category" not in said


# --- the routes --------------------------------------------------------------------------------


@pytest.fixture
async def pool(settings_factory: Callable[..., Settings]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_factory())
    try:
        yield pool
    finally:
        await close_pool(pool)


async def admin_get(api: Api, path: str, tenant: str = "TEN-0001") -> tuple[int, Any, Any]:
    return await api.get(path, tenant=tenant, user="admin-1", role="admin")


async def test_list_is_admin_only_paged_newest_first(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: GET /suppressions/ shows the tenant's entries to its admins only, newest
    first, paged with a Link to the next page."""
    for i in range(3):
        await store.add(pool, "TEN-0001", "email", f"Dead{i}@Example.com", "hard_bounce", "test")
    await store.add(
        pool, "TEN-0001", "email", "c@example.com", "unsubscribe", "test", category="digest"
    )
    status, first, headers = await api.get(PATH + "?limit=3", user="admin-1", role="admin")
    assert status == 200, first
    assert [e["address"] for e in first] == [
        "c@example.com",
        "dead2@example.com",
        "dead1@example.com",
    ]
    assert first[0]["category"] == "digest" and first[0]["reason"] == "unsubscribe"
    assert first[1]["category"] is None and first[1]["reason"] == "hard_bounce"
    assert 'rel="next"' in headers["Link"]
    next_url = headers["Link"].split(">")[0].lstrip("<")
    status, second, headers = await api.get(next_url, user="admin-1", role="admin")
    assert status == 200
    assert [e["address"] for e in second] == ["dead0@example.com"]
    assert "Link" not in headers
    for role in ("service", "user"):
        status, problem, headers = await api.get(PATH, role=role)
        assert status == 403, problem
        assert headers["Content-Type"].startswith(PROBLEM_JSON)


async def test_delete_takes_every_category_off_audited(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: DELETE /suppressions/{channel}/{address}/ (admin) removes the address's
    entries, writes an audit row, and answers 404 once there is nothing left."""
    await store.add(pool, "TEN-0001", "email", "ann@example.com", "complaint", "t", category="m")
    await store.add(pool, "TEN-0001", "email", "ann@example.com", "smtp_refused", "t")
    target = PATH + "email/Ann%40Example.com/"
    status, problem, _ = await api.request("DELETE", target, role="service")
    assert status == 403, problem
    status, _, _ = await api.request("DELETE", target, user="admin-1", role="admin")
    assert status == 204
    assert (await admin_get(api, PATH))[1] == []
    status, problem, headers = await api.request("DELETE", target, user="admin-1", role="admin")
    assert status == 404, problem
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    audit = await pool.fetchrow(
        "SELECT details FROM audit_log WHERE tenant_id = 'TEN-0001' AND action = $1",
        "suppression.delete",
    )
    assert audit is not None
    assert audit["details"]["address"] == "ann@example.com"
    assert audit["details"]["reasons"] == ["complaint", "smtp_refused"]


async def test_bad_path_values_are_a_problem_naming_the_field(api: Api) -> None:
    """Promise: a channel that cannot be suppressed or an address past the bound is a 422
    naming the field, and changes nothing."""
    status, problem, _ = await api.request(
        "DELETE", PATH + "in_app/someone/", user="admin-1", role="admin"
    )
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["channel"]
    status, problem, _ = await api.request(
        "DELETE", PATH + "email/" + "a" * 321 + "/", user="admin-1", role="admin"
    )
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["address"]
    status, problem, _ = await api.get(PATH + "?limit=100000", user="admin-1", role="admin")
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["limit"]


async def test_tenants_never_see_or_remove_each_others(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: one tenant's suppression list is invisible to another, and another's admin
    cannot take an address off it (404, as a made-up one)."""
    await store.add(pool, "TEN-0001", "sms", E164, "sms_opt_out", "twilio 21610")
    assert [e["address"] for e in (await admin_get(api, PATH))[1]] == [E164]
    assert (await admin_get(api, PATH, tenant="TEN-0002"))[1] == []
    target = PATH + "sms/%2B917568992589/"
    status, _, _ = await api.request(
        "DELETE", target, tenant="TEN-0002", user="admin-1", role="admin"
    )
    assert status == 404
    assert [e["address"] for e in (await admin_get(api, PATH))[1]] == [E164]


# --- email -------------------------------------------------------------------------------------


async def test_a_listed_email_address_is_suppressed_without_calling_the_relay(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a send to a listed address ends `suppressed` with the reason and the relay
    never hears of it; a hard bounce stops a critical send too; a category's entry stops
    that category only, and not a critical one; another tenant's list changes nothing."""
    daemon = await start(daemon_factory, smtp_sink)
    await store.add(db, "TEN-0001", "email", "dead@example.com", "hard_bounce", "DSN 5.1.1")
    await store.add(
        db, "TEN-0001", "email", "ann@example.com", "unsubscribe", "one-click", category="digest"
    )
    await store.add(db, "TEN-0002", "email", "bob@example.com", "hard_bounce", "DSN 5.1.1")
    async with Api(daemon) as api:
        dead = (await send(api, recipient="Dead@Example.com", critical=True))["notification_id"]
        digest = (await send(api, recipient="ann@example.com", category="digest"))[
            "notification_id"
        ]
        other = (await send(api, recipient="ann@example.com", category="interview"))[
            "notification_id"
        ]
        urgent = (await send(api, recipient="ann@example.com", category="digest", critical=True))[
            "notification_id"
        ]
        bob = (await send(api, recipient="bob@example.com"))["notification_id"]
        record = await wait_status(db, dead, "suppressed")
        assert "suppression list" in record["last_error"]
        assert "hard_bounce" in record["last_error"]
        record = await wait_status(db, digest, "suppressed")
        assert "unsubscribe" in record["last_error"] and "digest" in record["last_error"]
        for sent in (other, urgent, bob):
            await wait_status(db, sent, "sent")
    assert sorted(r.notifyd_id or "" for r in smtp_sink.received) == sorted([other, urgent, bob])
    assert "dead@example.com" not in [a.lower() for a in smtp_sink.rcpts]
    assert (await row(db, dead))["attempts"] == 0
