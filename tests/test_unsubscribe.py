"""One-click unsubscribe (RFC 8058, issue 29): the signed link, the headers, the route.

Promises checked (each test names its own): non-critical email carries `List-Unsubscribe:
<NOTIFYD_PUBLIC_URL/unsubscribe/{token}>` and `List-Unsubscribe-Post:
List-Unsubscribe=One-Click`, critical email neither; the token is signed and bounded, and a
forged, altered or foreign-key token is 404 and changes nothing; a POST as Gmail sends it opts
the user out of the category (the preference `/preferences/` shows) and the next send in it
is suppressed; for an email without a user id it is a suppression-list entry for that
category; the GET page has one button, no script, and escapes what it shows; the route is
rate limited (429 with Retry-After).
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import asyncpg
import pytest

from notifyd.app import Daemon
from notifyd.unsubscribe import TOKEN_MAX, Unsubscribe, derive_key, sign, verify
from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import Api
from tests.smtp_sink import SmtpSink
from tests.test_pipeline_email import arrived, send, start, wait_status, with_id

SECRET = "a-test-unsubscribe-secret-of-32-chars-at-least"
KEY = derive_key(SECRET)
GMAIL_BODY = {"List-Unsubscribe": "One-Click"}


# --- the token ---------------------------------------------------------------------------------


def test_a_token_names_tenant_recipient_and_category_and_only_its_key_verifies_it() -> None:
    """Promise: what is signed is what verifies, with this key only; any other key, or one
    character changed anywhere, is not a token."""
    for what in (
        Unsubscribe("TEN-0001", "cand|7", None, "digest"),
        Unsubscribe("TEN-0001", None, "ann@example.com", ""),
    ):
        token = sign(KEY, what)
        assert token is not None and re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", token)
        assert verify(KEY, token) == what
        assert verify(derive_key(SECRET + "x"), token) is None
        for i in range(len(token)):
            for char in "A_.":
                altered = token[:i] + char + token[i + 1 :]
                if altered != token:
                    assert verify(KEY, altered) is None, (i, char)
        assert verify(KEY, token + "A") is None
        assert verify(KEY, token + "=") is None


def test_tokens_are_bounded_and_a_field_that_cannot_be_carried_gets_no_link() -> None:
    """Promise: a token never passes TOKEN_MAX (longer strings are not read at all), and a
    value with the separator, or too long to carry, gets no link rather than a broken one."""
    longest = sign(KEY, Unsubscribe("t" * 256, None, "a" * 64 + "@" + "d" * 255, "c" * 64))
    assert longest is not None and len(longest) <= TOKEN_MAX
    assert sign(KEY, Unsubscribe("t" * 1000, "u", None, "")) is None
    assert sign(KEY, Unsubscribe("TEN\x1f1", "u", None, "")) is None
    assert verify(KEY, "A" * (TOKEN_MAX + 1)) is None
    assert verify(KEY, "not a token") is None
    assert verify(KEY, "") is None


# --- end to end --------------------------------------------------------------------------------


async def one_click_daemon(
    daemon_factory: DaemonFactory, sink: SmtpSink, **env: str
) -> tuple[Daemon, str]:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    daemon = await start(
        daemon_factory,
        sink,
        NOTIFYD_PORT=str(port),
        NOTIFYD_PUBLIC_URL=public,
        NOTIFYD_UNSUBSCRIBE_SECRET=SECRET,
        **env,
    )
    return daemon, public


async def header_of(sink: SmtpSink, notification_id: str) -> tuple[str | None, str | None]:
    await arrived(sink, 1)
    [received] = with_id(sink, notification_id)
    unsubscribe = received.message["List-Unsubscribe"]
    post = received.message["List-Unsubscribe-Post"]
    return (None if unsubscribe is None else str(unsubscribe)), (
        None if post is None else str(post)
    )


async def post_form(
    session: aiohttp.ClientSession, url: str, body: Any = GMAIL_BODY
) -> tuple[int, str]:
    async with session.post(url, data=body) as response:
        return response.status, await response.text()


async def test_a_one_click_post_as_gmail_sends_it_opts_the_user_out_of_the_category(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """Promise: a non-critical email carries both RFC 8058 headers, pointing at
    NOTIFYD_PUBLIC_URL; Gmail's POST answers 200 and opts the user out of the category (as
    /preferences/ shows it, with what they saved kept); the next email in that category is
    suppressed, another category's is sent; critical email carries no link."""
    daemon, public = await one_click_daemon(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        status, _, _ = await api.request(
            "PUT", "/preferences/", json={"channels": {"sms": False}}, user="cand-1"
        )
        assert status == 200
        first = (await send(api, user_id="cand-1", category="digest"))["notification_id"]
        await wait_status(db, first, "sent")
        unsubscribe, post = await header_of(smtp_sink, first)
        assert post == "List-Unsubscribe=One-Click"
        assert unsubscribe is not None
        url = unsubscribe.strip()[1:-1]
        assert url.startswith(f"{public}/unsubscribe/")
        assert unsubscribe.strip() == f"<{url}>"

        status, text = await post_form(session, url)
        assert status == 200, text
        assert "digest" in text
        status, prefs, _ = await api.get("/preferences/", user="cand-1")
        assert prefs == {"channels": {"sms": False}, "categories": {"digest": False}}
        assert (await post_form(session, url))[0] == 200  # once more: still 200

        again = (await send(api, user_id="cand-1", category="digest"))["notification_id"]
        other = (await send(api, user_id="cand-1", category="interview"))["notification_id"]
        critical = (await send(api, user_id="cand-1", category="digest", critical=True))[
            "notification_id"
        ]
        record = await wait_status(db, again, "suppressed")
        assert "digest" in record["last_error"]
        await wait_status(db, other, "sent")
        await wait_status(db, critical, "sent")
        await arrived(smtp_sink, 3)
    [urgent] = with_id(smtp_sink, critical)
    assert urgent.message["List-Unsubscribe"] is None
    assert urgent.message["List-Unsubscribe-Post"] is None
    audit = await db.fetchrow(
        "SELECT user_id, details FROM audit_log WHERE action = 'preferences.unsubscribe'"
    )
    assert audit is not None and audit["user_id"] == "cand-1"


async def test_without_a_user_id_the_address_is_suppressed_for_that_category(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """Promise: an email that names no user opts its address out through the suppression
    list, for that category only, in its tenant only."""
    daemon, _ = await one_click_daemon(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        first = (await send(api, recipient="Ann@Example.com", category="digest"))["notification_id"]
        await wait_status(db, first, "sent")
        unsubscribe, _ = await header_of(smtp_sink, first)
        assert unsubscribe is not None
        assert (await post_form(session, unsubscribe.strip()[1:-1]))[0] == 200
        status, listed, _ = await api.get("/suppressions/", user="admin-1", role="admin")
        assert status == 200
        assert [(e["address"], e["category"], e["reason"]) for e in listed] == [
            ("ann@example.com", "digest", "unsubscribe")
        ]
        other_tenant = await api.get(
            "/suppressions/", tenant="TEN-0002", user="admin-1", role="admin"
        )
        assert other_tenant[1] == []
        again = (await send(api, recipient="ann@example.com", category="digest"))["notification_id"]
        other = (await send(api, recipient="ann@example.com", category="interview"))[
            "notification_id"
        ]
        await wait_status(db, again, "suppressed")
        await wait_status(db, other, "sent")


async def test_forged_or_altered_tokens_are_404_and_change_nothing(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """Promise: a token signed with another key, or altered, answers 404 on GET and POST
    and opts no one out."""
    daemon, public = await one_click_daemon(daemon_factory, smtp_sink)
    genuine = sign(KEY, Unsubscribe("TEN-0001", "cand-2", None, "digest"))
    forged = sign(
        derive_key("another-secret-another-secret-another"),
        Unsubscribe("TEN-0001", "cand-2", None, "digest"),
    )
    assert genuine is not None and forged is not None
    payload, mac = genuine.split(".")
    altered_tenant = sign(KEY, Unsubscribe("TEN-0002", "cand-2", None, "digest"))
    assert altered_tenant is not None
    swapped = altered_tenant.split(".")[0] + "." + mac
    async with Api(daemon) as api:
        for token in (forged, swapped, payload, "x" * 2000, genuine[:-1]):
            url = f"{public}/unsubscribe/{token}"
            assert (await post_form(session, url))[0] == 404
            async with session.get(url) as response:
                assert response.status == 404
                assert response.content_type == "application/problem+json"
        for tenant in ("TEN-0001", "TEN-0002"):
            prefs = (await api.get("/preferences/", tenant=tenant, user="cand-2"))[1]
            assert prefs == {"channels": {}, "categories": {}}
        assert await db.fetchval("SELECT count(*) FROM suppressions") == 0
        # the genuine one works: the 404s were the signature's
        assert (await post_form(session, f"{public}/unsubscribe/{genuine}"))[0] == 200


async def test_get_shows_one_button_no_script_and_escapes_and_a_bad_body_is_named(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, session: aiohttp.ClientSession
) -> None:
    """Promise: the page is one form posting List-Unsubscribe=One-Click back, with no script,
    what it shows escaped; a POST without the one-click field is a 422 naming it, one too
    large a 413, and neither opts anyone out."""
    daemon, public = await one_click_daemon(daemon_factory, smtp_sink)
    token = sign(KEY, Unsubscribe("TEN-0001", "cand-3", None, "<b>news</b>&"))
    assert token is not None
    url = f"{public}/unsubscribe/{token}"
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "<script" not in page.lower()
    assert page.count("<form") == 1 and page.count("<button") == 1
    assert '<form method="post">' in page
    assert 'name="List-Unsubscribe" value="One-Click"' in page
    assert "&lt;b&gt;news&lt;/b&gt;&amp;" in page and "<b>news" not in page
    async with session.post(url, data={"List-Unsubscribe": "yes"}) as response:
        assert response.status == 422
        problem = await response.json(content_type=None)
        assert [e["field"] for e in problem["errors"]] == ["List-Unsubscribe"]
    async with session.post(url, data={"x": "y" * 5000, **GMAIL_BODY}) as response:
        assert response.status == 413
    async with session.post(url, json=GMAIL_BODY) as response:
        assert response.status == 415
    async with Api(daemon) as api:
        prefs = (await api.get("/preferences/", user="cand-3"))[1]
    assert prefs == {"channels": {}, "categories": {}}


@pytest.mark.parametrize("scope", ["ip", "global"])
async def test_the_route_is_rate_limited(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, session: aiohttp.ClientSession, scope: str
) -> None:
    """Promise: past NOTIFYD_UNSUBSCRIBE_BURST the route answers 429 with Retry-After (per
    client address, or for all clients together), forged tokens included."""
    _, public = await one_click_daemon(
        daemon_factory,
        smtp_sink,
        NOTIFYD_UNSUBSCRIBE_RATE="0.01",
        NOTIFYD_UNSUBSCRIBE_BURST="2",
        NOTIFYD_UNSUBSCRIBE_RATE_SCOPE=scope,
    )
    token = sign(KEY, Unsubscribe("TEN-0001", "cand-4", None, "digest"))
    statuses = []
    for _ in range(3):
        async with session.get(f"{public}/unsubscribe/{token}") as response:
            statuses.append(response.status)
            retry_after = response.headers.get("Retry-After")
    assert statuses == [200, 200, 429]
    assert retry_after is not None and int(retry_after) >= 1
