"""`<notifyd-chat>` in a real browser: two people chat, and nothing is lost or doubled.

Two browser contexts (two people, each with their own storage) load a host page on another
origin; the component comes from an in-process daemon with real PostgreSQL and Redis.
"""

from __future__ import annotations

import time
from pathlib import Path

from playwright.async_api import Browser, Page

from tests.conftest import DaemonFactory
from tests.helpers import Api
from tests.ui_browser import (
    CHAT,
    HostSite,
    needs_chromium,
    open_chat,
    serious_violations,
    start_daemon,
)

pytestmark = needs_chromium
TENANT = "TEN-UI"
ALICE = "candidate-1"
BOB = "employer-2"


async def two_people(browser: Browser, site: HostSite) -> tuple[Page, Page]:
    alice = await (await browser.new_context()).new_page()
    bob = await (await browser.new_context()).new_page()
    await open_chat(alice, site, TENANT, ALICE, peer=BOB)
    await open_chat(bob, site, TENANT, BOB, peer=ALICE)
    return alice, bob


async def texts(page: Page) -> list[str]:
    found: list[str] = await page.evaluate(
        f"""() => [...document.querySelector('{CHAT}').shadowRoot
            .querySelectorAll('[part~="message"]')].map((m) => m.textContent)"""
    )
    return found


async def part_text(page: Page, part: str) -> str:
    text: str = await page.evaluate(
        f"""() => document.querySelector('{CHAT}').shadowRoot
            .querySelector('[part~="{part}"]')?.textContent ?? ''"""
    )
    return text


async def wait_part(page: Page, part: str, text: str, timeout_ms: float = 5_000) -> None:
    await page.wait_for_function(
        f"""(text) => [...document.querySelector('{CHAT}').shadowRoot
            .querySelectorAll('[part~="{part}"]')].some((e) => e.textContent.includes(text))""",
        arg=text,
        timeout=timeout_ms,
    )


async def test_two_people_chat_with_typing_presence_and_read_receipts(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser, tmp_path: Path
) -> None:
    await start_daemon(daemon_factory, site)
    alice_context = await browser.new_context()
    alice = await alice_context.new_page()
    await open_chat(alice, site, TENANT, ALICE, peer=BOB)
    await wait_part(alice, "presence", f"{BOB} is offline")
    bob = await (await browser.new_context()).new_page()
    await open_chat(bob, site, TENANT, BOB, peer=ALICE)
    await wait_part(alice, "presence", f"{BOB} is online")
    await wait_part(bob, "presence", f"{ALICE} is online")

    # typing shows on the other side
    composer = alice.locator(f'{CHAT} [part~="composer"] textarea')
    await composer.press_sequentially("Hel")
    await wait_part(bob, "typing", f"{ALICE} is typing")

    # Enter sends; the other sees it within a second; the sender sees it once
    await composer.press_sequentially("lo Bob")
    sent_at = time.monotonic()
    await composer.press("Enter")
    await wait_part(bob, "message", "Hello Bob", timeout_ms=1_000)
    assert time.monotonic() - sent_at < 1.5
    await alice.wait_for_function(
        f"""() => !document.querySelector('{CHAT}').shadowRoot
            .querySelector('[part~="pending"]')"""
    )
    assert await texts(alice) == ["Hello Bob"]
    assert await texts(bob) == ["Hello Bob"]
    assert await part_text(bob, "typing") == ""  # the message ends the indicator

    # bob's page is open and visible: it reads, and alice sees the receipt
    await wait_part(alice, "receipt", "Seen")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    await alice.screenshot(path=artifacts / "chat.png")

    # bob answers; alice leaves and bob sees the presence change
    bob_composer = bob.locator(f'{CHAT} [part~="composer"] textarea')
    await bob_composer.fill("Hi Alice")
    await bob_composer.press("Enter")
    await wait_part(alice, "message", "Hi Alice", timeout_ms=1_000)
    assert await texts(alice) == ["Hello Bob", "Hi Alice"]
    await alice_context.close()
    await wait_part(bob, "presence", f"{ALICE} is offline")


async def test_the_composer_refuses_what_the_server_refuses_with_its_message(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    await start_daemon(daemon_factory, site, NOTIFYD_MESSAGE_MAX_LENGTH="10")
    alice, bob = await two_people(browser, site)
    composer = alice.locator(f'{CHAT} [part~="composer"] textarea')
    await composer.fill("far too long a message")
    await composer.press("Enter")
    await alice.wait_for_function(
        f"""() => document.querySelector('{CHAT}').shadowRoot.querySelector('.error')
            .textContent.includes('message: must be at most 10 characters')"""
    )
    assert await composer.input_value() == "far too long a message"  # kept to edit
    assert await texts(alice) == []
    await composer.fill("short")
    await composer.press("Enter")
    await wait_part(bob, "message", "short")
    assert await texts(bob) == ["short"]


async def test_history_and_a_restart_lose_and_double_nothing(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    port = daemon.port
    other = await daemon_factory(NOTIFYD_ALLOWED_ORIGINS=site.origin)
    alice, bob = await two_people(browser, site)
    composer = alice.locator(f'{CHAT} [part~="composer"] textarea')
    await composer.fill("one")
    await composer.press("Enter")
    await wait_part(bob, "message", "one")

    await daemon.stop()
    await bob.wait_for_function(f"document.querySelector('{CHAT}').dataset.state === 'offline'")
    # meanwhile alice writes on another instance (her page is on the stopped one too:
    # a third page of hers, opened on the other instance, stands in for another tab)
    site.base_url = f"http://127.0.0.1:{other.port}"
    tab = await (await browser.new_context()).new_page()
    await open_chat(tab, site, TENANT, ALICE, peer=BOB)
    for text in ("two", "three"):
        await tab.locator(f'{CHAT} [part~="composer"] textarea').fill(text)
        await tab.locator(f'{CHAT} [part~="composer"] textarea').press("Enter")
        await wait_part(tab, "message", text)
    # and from alice's first page, while it is offline: sent once it is back
    await composer.fill("four")
    await composer.press("Enter")

    await start_daemon(daemon_factory, site, NOTIFYD_PORT=str(port))
    await bob.wait_for_function(
        f"""() => document.querySelector('{CHAT}').shadowRoot
            .querySelectorAll('[part~="message"]').length >= 4""",
        timeout=20_000,
    )
    await alice.wait_for_function(
        f"""() => !document.querySelector('{CHAT}').shadowRoot
            .querySelector('[part~="pending"]')""",
        timeout=20_000,
    )
    assert await texts(bob) == ["one", "two", "three", "four"]
    assert await texts(alice) == ["one", "two", "three", "four"]

    # a fresh page reads the history over REST, in order
    fresh = await (await browser.new_context()).new_page()
    await open_chat(fresh, site, TENANT, BOB, peer=ALICE)
    assert await texts(fresh) == ["one", "two", "three", "four"]


async def test_no_serious_or_critical_accessibility_violation(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    await start_daemon(daemon_factory, site)
    alice, bob = await two_people(browser, site)
    composer = alice.locator(f'{CHAT} [part~="composer"] textarea')
    await composer.fill("Accessible")
    await composer.press("Enter")
    await wait_part(bob, "message", "Accessible")
    for page in (alice, bob):
        bad = await serious_violations(page)
        assert bad == [], bad


async def test_a_group_room_shows_senders_presence_and_who_has_seen(
    daemon_factory: DaemonFactory, site: HostSite, browser: Browser
) -> None:
    daemon = await start_daemon(daemon_factory, site)
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/rooms/", {"name": "panel-42", "members": [BOB]}, tenant=TENANT, user=ALICE
        )
        assert status == 201, body
    alice = await (await browser.new_context()).new_page()
    bob = await (await browser.new_context()).new_page()
    await open_chat(alice, site, TENANT, ALICE, room="panel-42")
    await open_chat(bob, site, TENANT, BOB, room="panel-42")
    await wait_part(alice, "presence", "2 online")
    composer = alice.locator(f'{CHAT} [part~="composer"] textarea')
    await composer.fill("Panel at 3pm")
    await composer.press("Enter")
    await wait_part(bob, "message", f"{ALICE}Panel at 3pm")  # the sender is named
    await wait_part(alice, "receipt", f"Seen by {BOB}")
