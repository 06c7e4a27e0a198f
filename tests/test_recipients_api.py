"""Recipients over REST (issue 27): where a workflow step reaches a user.

Promises checked: a service (or admin) stores a user's recipient and reads it back, the
phone in E.164 read in the tenant's region, a PUT replacing the whole recipient; bad values
are a 422 naming each field (email, phone, IANA zone, language tag, single-line values,
unknown fields) and store nothing; a user reads their own at /recipients/me/ and changes only
its time zone and locale, never another's, never their addresses; tenant B neither sees
nor deletes tenant A's recipient; every change leaves an audit row.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from tests.helpers import Api

TENANT = "TEN-0001"
OTHER_TENANT = "TEN-0002"
SERVICE = "hiring-backend"
USER = "cand-1"


async def put(
    api: Api, user_id: str, body: dict[str, Any], *, tenant: str = TENANT, role: str = "service"
) -> tuple[int, Any]:
    status, answer, _ = await api.request(
        "PUT", f"/recipients/{user_id}/", json=body, tenant=tenant, user=SERVICE, role=role
    )
    return status, answer


def fields(answer: dict[str, Any]) -> dict[str, str]:
    return {e["field"]: e["message"] for e in answer["errors"]}


async def test_service_stores_a_recipient_with_the_phone_in_e164_and_reads_it_back(
    api: Api, db: asyncpg.Connection
) -> None:
    body = {
        "email": "cand@example.com",
        "phone": "(415) 555-2671",
        "timezone": "Europe/Berlin",
        "locale": "pt_br",
        "name": "Ada Lovelace",
    }
    status, answer = await put(api, USER, body)
    assert status == 200, answer
    assert answer["phone"] == "+14155552671"  # read in the default region, US
    assert answer["locale"] == "pt-BR"
    assert (answer["user_id"], answer["email"], answer["timezone"], answer["name"]) == (
        USER,
        "cand@example.com",
        "Europe/Berlin",
        "Ada Lovelace",
    )
    status, again, _ = await api.get(f"/recipients/{USER}/", user=SERVICE, role="admin")
    assert status == 200 and again == answer
    row = await db.fetchrow("SELECT * FROM recipients WHERE user_id = $1", USER)
    assert row is not None and row["tenant_id"] == TENANT and row["phone"] == "+14155552671"
    audit = await db.fetchval("SELECT count(*) FROM audit_log WHERE action = 'recipient.put'")
    assert audit == 1

    # a PUT replaces the whole recipient: what is left out is cleared
    status, answer = await put(api, USER, {"email": "new@example.com"})
    assert status == 200, answer
    assert answer["email"] == "new@example.com"
    assert answer["phone"] is None and answer["timezone"] is None and answer["name"] is None


async def test_bad_values_are_a_422_naming_each_field_and_store_nothing(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await put(
        api,
        USER,
        {
            "email": "not-an-address",
            "phone": "12",
            "timezone": "Mars/Olympus",
            "locale": "not a locale",
            "name": "Ada\r\nBcc: everyone@example.com",
            "fax": "1",
        },
    )
    assert status == 422, answer
    found = fields(answer)
    assert set(found) == {"email", "timezone", "locale", "name", "fax"}, found
    assert "IANA" in found["timezone"]
    # the phone is read after the body's own checks, so it is named once those pass
    status, answer = await put(api, USER, {"phone": "12"})
    assert status == 422 and set(fields(answer)) == {"phone"}, answer
    status, answer = await put(api, "bad id with spaces", {})
    assert status == 422 and set(fields(answer)) == {"user_id"}, answer
    assert await db.fetchval("SELECT count(*) FROM recipients") == 0


async def test_a_user_reads_and_changes_only_their_own_zone_and_locale(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer, _ = await api.get("/recipients/me/", user=USER)
    assert status == 404, answer
    status, answer = await put(api, USER, {"email": "cand@example.com", "locale": "en"})
    assert status == 200, answer

    status, answer, _ = await api.request(
        "PATCH", "/recipients/me/", json={"timezone": "America/New_York"}, user=USER
    )
    assert status == 200, answer
    assert answer["timezone"] == "America/New_York"
    assert answer["email"] == "cand@example.com" and answer["locale"] == "en"  # kept

    status, answer, _ = await api.request(
        "PATCH", "/recipients/me/", json={"email": "mine@example.com"}, user=USER
    )
    assert status == 422 and set(fields(answer)) == {"email"}, answer
    status, answer, _ = await api.request(
        "PATCH", "/recipients/me/", json={"timezone": "Nowhere/Land"}, user=USER
    )
    assert status == 422 and set(fields(answer)) == {"timezone"}, answer

    # a user may not read or write anyone's recipient through the user-id path
    status, answer, _ = await api.get(f"/recipients/{USER}/", user=USER)
    assert status == 403, answer
    status, answer = await put(api, "someone-else", {"email": "x@example.com"}, role="user")
    assert status == 403, answer
    status, answer, _ = await api.get("/recipients/me/", user=USER)
    assert status == 200 and answer["timezone"] == "America/New_York"
    patched = "SELECT count(*) FROM audit_log WHERE action = 'recipient.patch'"
    assert await db.fetchval(patched) == 1


async def test_tenant_b_neither_sees_nor_deletes_tenant_as_recipient(
    api: Api, db: asyncpg.Connection
) -> None:
    status, answer = await put(api, USER, {"email": "cand@example.com"})
    assert status == 200, answer
    status, answer, _ = await api.get(
        f"/recipients/{USER}/", tenant=OTHER_TENANT, user=SERVICE, role="service"
    )
    assert status == 404, answer
    status, answer, _ = await api.request(
        "DELETE", f"/recipients/{USER}/", tenant=OTHER_TENANT, user=SERVICE, role="service"
    )
    assert status == 404, answer
    status, answer, _ = await api.get("/recipients/me/", tenant=OTHER_TENANT, user=USER)
    assert status == 404, answer

    status, answer, _ = await api.request(
        "DELETE", f"/recipients/{USER}/", user=SERVICE, role="service"
    )
    assert status == 204, answer
    assert await db.fetchval("SELECT count(*) FROM recipients") == 0
    deleted = "SELECT count(*) FROM audit_log WHERE action = 'recipient.delete'"
    assert await db.fetchval(deleted) == 1
