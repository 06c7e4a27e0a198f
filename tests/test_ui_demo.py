"""The demo page (`/ui/demo`, DEBUG only) works in a real browser: a newcomer sends alice's
notification to bob, sees bob's badge rise, and chats between the two. Its screenshot is
kept as a test artifact (docs/img/demo.png is one such copy, shown in README)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DaemonFactory
from tests.ui_browser import chromium, needs_chromium

pytestmark = needs_chromium


async def test_the_demo_page_shows_two_inboxes_and_a_chat_working(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    daemon = await daemon_factory(DEBUG="true")
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1100, "height": 900})
        await page.goto(f"http://127.0.0.1:{daemon.port}/ui/demo")
        for element in ("#inbox-alice", "#inbox-bob", "#chat-alice", "#chat-bob"):
            await page.wait_for_function(
                f"document.querySelector('{element}').dataset.state === 'live'"
            )
        await page.locator('form[data-from="alice"] button').click()
        bob_badge = page.locator('#inbox-bob [part~="badge"]')
        await bob_badge.wait_for(state="visible")
        assert await bob_badge.text_content() == "1"

        composer = page.locator('#chat-alice [part~="composer"] textarea')
        await composer.fill("Bonjour Bob")
        await composer.press("Enter")
        await page.locator('#chat-bob [part~="message"]', has_text="Bonjour Bob").wait_for()
        await page.locator('#chat-alice [part~="receipt"]', has_text="Seen").wait_for()
        await page.locator('#inbox-bob [part~="bell"]').click()
        await page.locator('#inbox-bob [part~="item"]').first.wait_for()
        artifacts = tmp_path / "artifacts"
        artifacts.mkdir()
        await page.screenshot(path=artifacts / "demo.png", full_page=True)
