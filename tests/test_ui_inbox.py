"""`<notifyd-inbox>` in a real browser: the badge is never wrong and nothing is lost.

Headless Chromium (tests/ui_browser.py) loads a host page on another origin, which loads the
component from an in-process daemon with real PostgreSQL and Redis. Each test names the
promise of issue 28 it checks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page

from tests.conftest import DaemonFactory
from tests.helpers import Api
from tests.ui_browser import (
    HostSite,
    needs_chromium,
    open_inbox,
    serious_violations,
    start_daemon,
    wait_badge,
    wait_live,
)

pytestmark = needs_chromium
TENANT = "TEN-UI"
USER = "candidate-7"


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Screenshots land here (kept by pytest's tmp_path retention, one folder per test)."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    return folder


async def send(api: Api, subject: str, user: str = USER) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": user, "subject": subject, "message": "m"},
        tenant=TENANT,
        user="recruiter-1",
        role="service",
    )
    assert status == 202, body
    return str(body["notification_id"])


async def unread_over_rest(api: Api, user: str = USER) -> int:
    status, _, headers = await api.get("/notifications/?limit=1", tenant=TENANT, user=user)
    assert status == 200
    return int(headers["X-Unread-Count"])


async def items(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = await page.evaluate(
        """() => [...document.querySelector('notifyd-inbox').shadowRoot
            .querySelectorAll('[part~="item"]')].map((li) => ({
                id: li.dataset.id,
                subject: li.querySelector('.subject').textContent,
                unread: li.getAttribute('part').split(' ').includes('unread'),
            }))"""
    )
    return found


async def test_a_rest_send_raises_the_badge_within_a_second_and_mark_all_read_clears_it(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser, artifacts: Path
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    async with Api(daemon) as api:
        await open_inbox(page, site, TENANT, USER)
        await wait_badge(page, None)
        sent_at = time.monotonic()
        notification_id = await send(api, "Interview confirmed")
        await wait_badge(page, "1", timeout_ms=1_000)
        assert time.monotonic() - sent_at < 1.5  # (the wait's own bound is 1 s after the 202)
        label = await page.locator('notifyd-inbox [part~="bell"]').get_attribute("aria-label")
        assert label is not None and "1" in label

        await page.locator('notifyd-inbox [part~="bell"]').click()
        await page.locator('notifyd-inbox [part~="item"]').first.wait_for()
        shown = await items(page)
        assert shown == [{"id": notification_id, "subject": "Interview confirmed", "unread": True}]
        await page.screenshot(path=artifacts / "inbox.png")

        await page.locator('notifyd-inbox [part~="mark-all-read"]').click()
        await wait_badge(page, None)
        assert await unread_over_rest(api) == 0
        assert [i["unread"] for i in await items(page)] == [False]


async def test_opening_an_item_marks_it_read(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    async with Api(daemon) as api:
        await open_inbox(page, site, TENANT, USER)
        for n in range(2):
            await send(api, f"n{n}")
        await wait_badge(page, "2")
        await page.locator('notifyd-inbox [part~="bell"]').click()
        await page.locator('notifyd-inbox [part~="item"] button', has_text="n0").click()
        await wait_badge(page, "1")
        assert await unread_over_rest(api) == 1
        assert [(i["subject"], i["unread"]) for i in await items(page)] == [
            ("n1", True),
            ("n0", False),
        ]


async def test_marking_read_elsewhere_updates_the_badge_and_the_items(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    """Another tab, or another app over REST, marks notifications read: this page's badge
    follows within a second (the stale badge of novu#1008)."""
    daemon = await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    async with Api(daemon) as api:
        await open_inbox(page, site, TENANT, USER)
        first = await send(api, "first")
        await send(api, "second")
        await wait_badge(page, "2")
        status, body, _ = await api.post(
            "/notifications/mark-as-read/", {"ids": [first]}, tenant=TENANT, user=USER
        )
        assert status == 200, body
        await wait_badge(page, "1", timeout_ms=1_000)
        status, _, _ = await api.post(
            "/notifications/mark-as-read/", {"all": True}, tenant=TENANT, user=USER
        )
        assert status == 200
        await wait_badge(page, None, timeout_ms=1_000)
        await page.wait_for_function(
            """() => ![...document.querySelector('notifyd-inbox').shadowRoot
                .querySelectorAll('[part~="item"]')].some((li) => li.hasAttribute('data-unread'))"""
        )


async def test_after_a_server_restart_the_page_shows_every_notification_once_and_the_right_count(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    port = daemon.port
    other = await daemon_factory()  # another instance, taking sends while the first is down
    page = await browser.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    async with Api(daemon) as api, Api(other) as other_api:
        await open_inbox(page, site, TENANT, USER)
        sent = [await send(api, "before")]
        await wait_badge(page, "1")

        await daemon.stop()
        await page.wait_for_function(
            "document.querySelector('notifyd-inbox').dataset.state === 'offline'"
        )
        sent += [await send(other_api, f"meanwhile {n}") for n in range(3)]

        await start_daemon(daemon_factory, site, NOTIFYD_PORT=str(port))
        await wait_live(page, timeout_ms=20_000)
        await wait_badge(page, "4")
        await page.locator('notifyd-inbox [part~="bell"]').click()
        await page.wait_for_function(
            """() => document.querySelector('notifyd-inbox').shadowRoot
                .querySelectorAll('[part~="item"]').length >= 4"""
        )
        shown = await items(page)
        assert sorted(i["id"] for i in shown) == sorted(sent)  # each once
        assert await unread_over_rest(other_api) == 4
        assert len(sockets) >= 2 and "since=" in sockets[-1]


async def test_an_expiring_token_is_refreshed_without_losing_the_socket_or_its_events(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    # tokens of 4 s, no leeway: a socket not refreshed in time is closed with 4001 at once
    daemon = await start_daemon(daemon_factory, site, JWT_LEEWAY="0", NOTIFYD_WS_TOKEN_WARNING="2")
    site.ttl = 4
    page = await browser.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    async with Api(daemon) as api:
        await open_inbox(page, site, TENANT, USER)
        # past the first token's expiry and then some: three tokens at least
        await page.wait_for_function("window.tokenCalls >= 3", timeout=15_000)
        started = time.time()
        while time.time() - started < 1.5:  # (a short look for a close that should not come)
            await page.wait_for_timeout(100)
        assert await page.evaluate("document.querySelector('notifyd-inbox').dataset.state") == (
            "live"
        )
        await send(api, "after the refresh")
        await wait_badge(page, "1", timeout_ms=2_000)
        assert len(sockets) == 1, sockets


async def test_no_serious_or_critical_accessibility_violation(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    async with Api(daemon) as api:
        await open_inbox(page, site, TENANT, USER)
        await send(api, "Accessible")
        await wait_badge(page, "1")
        for panel_open in (False, True):
            if panel_open:
                await page.locator('notifyd-inbox [part~="bell"]').click()
                await page.locator('notifyd-inbox [part~="item"]').first.wait_for()
            bad = await serious_violations(page)
            assert bad == [], bad


async def test_keyboard_opens_the_panel_and_escape_returns_focus_to_the_bell(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    await open_inbox(page, site, TENANT, USER)
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    panel = page.locator('notifyd-inbox [part~="panel"]')
    await panel.wait_for(state="visible")
    assert await page.locator('notifyd-inbox [part~="bell"]').get_attribute("aria-expanded") == (
        "true"
    )
    await page.keyboard.press("Escape")
    await panel.wait_for(state="hidden")
    focused = await page.evaluate(
        "document.querySelector('notifyd-inbox').shadowRoot.activeElement?.getAttribute('part')"
    )
    assert focused == "bell"


async def test_the_panel_follows_the_link_cursor_and_shows_the_empty_state_in_french(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    page = await browser.new_page()
    async with Api(daemon) as api:
        await page.goto(site.url(TENANT, "nobody", locale="fr"))
        await page.locator('notifyd-inbox [part~="bell"]').click()
        status = page.locator("notifyd-inbox .status")
        await page.wait_for_function(
            """() => document.querySelector('notifyd-inbox').shadowRoot
                .querySelector('.status').textContent === 'Vous êtes à jour.'"""
        )
        assert await status.get_attribute("role") == "status"

        for n in range(45):  # more than one page (30)
            await send(api, f"p{n:02d}", user="pager")
        page = await browser.new_page()
        await open_inbox(page, site, TENANT, "pager")
        await wait_badge(page, "45")
        await page.locator('notifyd-inbox [part~="bell"]').click()
        await page.wait_for_function(
            """() => document.querySelector('notifyd-inbox').shadowRoot
                .querySelectorAll('[part~="item"]').length === 30"""
        )
        await page.locator('notifyd-inbox [part~="item"]').last.scroll_into_view_if_needed()
        await page.wait_for_function(
            """() => document.querySelector('notifyd-inbox').shadowRoot
                .querySelectorAll('[part~="item"]').length === 45"""
        )
        shown = await items(page)
        assert [i["subject"] for i in shown] == [f"p{n:02d}" for n in reversed(range(45))]
        assert all(i["unread"] for i in shown)  # from REST (both pages), unread as stored
