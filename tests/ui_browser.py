"""What the browser tests of the web components share (tests/test_ui_*.py).

A real Chromium (Debian's `chromium` package, which scripts/bootstrap.sh installs) driven by
Playwright; never a Playwright browser download. The components are loaded the way a product
team loads them: by a host page on another origin (127.0.0.2, not the daemon's 127.0.0.1),
whose `tokenProvider` asks that host for a token, as a real product's back end would mint one.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from bench.ui import CHROMIUM, CHROMIUM_ARGS
from notifyd.app import Daemon
from notifyd.settings import Settings
from scripts.localservers import free_port
from tests.helpers import token

if TYPE_CHECKING:
    from tests.conftest import DaemonFactory

HOST_IP = "127.0.0.2"  # another origin than the daemon's 127.0.0.1 (all of 127/8 is loopback)
AXE = Path(__file__).parent / "ui_vendor" / "axe-core" / "axe.min.js"
INBOX = "notifyd-inbox"
CHAT = "notifyd-chat"

needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (scripts/bootstrap.sh)"
)


async def serious_violations(page: Page) -> list[tuple[str, str, list[Any]]]:
    """axe-core's serious and critical accessibility violations on the page as it is:
    (rule, help, the elements at fault)."""
    await page.add_script_tag(path=str(AXE))
    result = await page.evaluate("axe.run(document)")
    return [
        (v["id"], v["help"], [n["target"] for n in v["nodes"]])
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


async def start_daemon(daemon_factory: DaemonFactory, site: HostSite, **env: str) -> Daemon:
    """A daemon that lets the site's origin in, and the site pointed at it."""
    daemon = await daemon_factory(NOTIFYD_ALLOWED_ORIGINS=site.origin, **env)
    site.settings = daemon.settings
    site.base_url = f"http://127.0.0.1:{daemon.port}"
    return daemon


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class HostSite:
    """A product's page on its own origin: it loads the component from the daemon and gives
    it tokens minted for the user (`ttl` seconds each)."""

    port: int = field(default_factory=free_port)
    settings: Settings | None = None  # the daemon's, once it runs (tokens are signed for it)
    base_url: str = ""
    ttl: int = 600
    tokens_minted: int = 0
    runner: web.AppRunner | None = None

    @property
    def origin(self) -> str:
        return f"http://{HOST_IP}:{self.port}"

    def url(self, tenant: str, user: str, locale: str = "en", **chat: str) -> str:
        """The page of an inbox, or with `peer=` or `room=` of a chat."""
        extra = "".join(f"&{key}={value}" for key, value in chat.items())
        return f"{self.origin}/?tenant={tenant}&user={user}&locale={locale}{extra}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/token", self._token)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST_IP, self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        tenant, user = request.query["tenant"], request.query["user"]
        locale = request.query.get("locale", "en")
        element, target = INBOX, ""
        for key in ("peer", "room"):
            if key in request.query:
                element, target = CHAT, f' {key}="{request.query[key]}"'
        page = f"""<!doctype html>
<html lang="{locale}"><head><meta charset="utf-8"><title>Host page</title></head>
<body><main><h1>Product</h1>
<{element} base-url="{self.base_url}" tenant="{tenant}" user="{user}" locale="{locale}"{target}>
</{element}>
<div style="height: 480px"></div></main>
<script type="module">
  import "{self.base_url}/ui/{element}.js";
  window.tokenCalls = 0;
  document.querySelector("{element}").tokenProvider = async () => {{
    window.tokenCalls += 1;
    const response = await fetch("/token?tenant={tenant}&user={user}");
    return response.text();
  }};
</script></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def _token(self, request: web.Request) -> web.Response:
        assert self.settings is not None
        self.tokens_minted += 1
        minted = token(self.settings, request.query["tenant"], request.query["user"], ttl=self.ttl)
        return web.Response(text=minted)


async def open_inbox(page: Page, site: HostSite, tenant: str, user: str) -> None:
    """Loads the host page and waits until the inbox's socket is open and caught up (its
    element's `data-state` is "live" once the server sent the count that ends a catch-up)."""
    await page.goto(site.url(tenant, user))
    await wait_live(page)


async def open_chat(page: Page, site: HostSite, tenant: str, user: str, **target: str) -> None:
    """Loads a chat page (`peer=` or `room=`) and waits until it is caught up."""
    await page.goto(site.url(tenant, user, **target))
    await wait_live(page, CHAT)


async def wait_live(page: Page, element: str = INBOX, timeout_ms: float = 10_000) -> None:
    await page.wait_for_function(
        f"document.querySelector('{element}')?.dataset.state === 'live'", timeout=timeout_ms
    )


async def badge(page: Page) -> str | None:
    """The badge's text, or None while it is hidden (no unread notification)."""
    value: str | None = await page.evaluate(
        """() => {
            const b = document.querySelector('notifyd-inbox').shadowRoot
                .querySelector('[part~="badge"]');
            return b.hidden ? null : b.textContent;
        }"""
    )
    return value


async def wait_badge(page: Page, expected: str | None, timeout_ms: float = 5_000) -> None:
    shown = "b.hidden ? null : b.textContent"
    await page.wait_for_function(
        f"""(expected) => {{
            const b = document.querySelector('notifyd-inbox').shadowRoot
                .querySelector('[part~="badge"]');
            return ({shown}) === expected;
        }}""",
        arg=expected,
        timeout=timeout_ms,
    )
