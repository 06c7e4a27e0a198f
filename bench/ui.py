"""`ui`: the web components' weight, time to first render, and a 1,000-item inbox's scroll.

Against a running notifyd (`--url`, loopback) in headless Chromium (Debian's `chromium`,
driven by Playwright; never a Playwright browser download):

- `sizes`: each module as notifyd serves it (`/ui/<name>`), bytes and gzip -9 bytes, and
  each component with the core it imports (what a page downloads for it);
- `first_render_ms`: from navigation start to the component's bell (or chat composer) in its
  shadow root, page and modules fetched fresh each time (a new browser context per load),
  median and max of `--loads` loads. The host page is a product's page on another origin:
  the harness serves it at `http://127.0.0.1:<--page-port>`, which the daemon must allow
  (`NOTIFYD_ALLOWED_ORIGINS=http://127.0.0.1:8799` with the default port), as a real host
  page's origin is allowed;
- `scroll`: `--notifications` in-app notifications sent to a user of its own (tenant
  `bench-<run>`, REST, a service token), then the inbox's panel is scrolled to its end
  (following the Link cursor, 30 a page) and back to the top while a PerformanceObserver
  records long tasks (> 50 ms, the browser's own definition): `longest_task_ms` (0 when
  none), `long_tasks`, the items shown, and how long the scroll took.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import secrets
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from bench.common import (
    DEFAULT_URL,
    BenchError,
    TokenMinter,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    require_loopback_url,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODULES = ("notifyd-core.js", "notifyd-inbox.js", "notifyd-chat.js")
SEND_CONCURRENCY = 16
# what a first render is, per component: the element the user sees first
FIRST = {"notifyd-inbox": '[part~="bell"]', "notifyd-chat": '[part~="composer"]'}


@dataclass(frozen=True)
class UiOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    loads: int = 5
    notifications: int = 1000
    page_port: int = 8799


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint tokens")
    parser.add_argument("--loads", type=int, default=5, help="page loads per component")
    parser.add_argument(
        "--notifications", type=int, default=1000, help="notifications in the scrolled inbox"
    )
    parser.add_argument(
        "--page-port",
        type=int,
        default=8799,
        help="the host pages' port on 127.0.0.1 (its origin must be in the daemon's "
        "NOTIFYD_ALLOWED_ORIGINS)",
    )


def options_from(args: argparse.Namespace) -> UiOptions:
    return options_of(UiOptions, args)


def host_page(url: str, element: str, attributes: str, token: str) -> str:
    """A product's page holding one component; `window.firstRender` is the milliseconds from
    the page's first script to the component's first part in its shadow root."""
    selector = FIRST[element]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>bench</title>
<script>window.pageStart = performance.now();</script>
</head><body><main><{element} base-url="{url}" {attributes}></{element}></main>
<script type="module">
  import "{url}/ui/{element}.js";
  const host = document.querySelector("{element}");
  const check = () => host.shadowRoot?.querySelector('{selector}')
    ? (window.firstRender = performance.now() - window.pageStart)
    : requestAnimationFrame(check);
  check();
  window.longTasks = [];
  new PerformanceObserver((list) => {{
    for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
  }}).observe({{ type: "longtask", buffered: true }});
  host.tokenProvider = async () => "{token}";
</script></body></html>"""


class HostPages:
    """The harness's own web server: the host pages, at their own origin."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pages: dict[str, str] = {}
        self._runner: web.AppRunner | None = None

    def add(self, html: str) -> str:
        name = f"/page-{len(self.pages)}"
        self.pages[name] = html
        return f"http://127.0.0.1:{self.port}{name}"

    async def __aenter__(self) -> HostPages:
        app = web.Application()
        app.router.add_get("/{name}", self._page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _page(self, request: web.Request) -> web.Response:
        html = self.pages.get(request.path)
        if html is None:
            raise web.HTTPNotFound()
        return web.Response(text=html, content_type="text/html")


async def sizes(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    served: dict[str, bytes] = {}
    for name in MODULES:
        async with session.get(f"{url}/ui/{name}") as response:
            if response.status != 200:
                raise BenchError(f"GET /ui/{name}: {response.status}")
            served[name] = await response.read()
    figures: dict[str, Any] = {
        name: {"bytes": len(body), "gzip_bytes": len(gzip.compress(body, 9))}
        for name, body in served.items()
    }
    for component in ("notifyd-inbox.js", "notifyd-chat.js"):
        both = [served["notifyd-core.js"], served[component]]
        figures[f"{component} + core"] = {
            "bytes": sum(len(b) for b in both),
            "gzip_bytes": sum(len(gzip.compress(b, 9)) for b in both),
        }
    return figures


async def first_renders(browser: Any, pages: HostPages, url: str, token: str, loads: int) -> Any:
    figures: dict[str, Any] = {}
    for element, attributes in (
        ("notifyd-inbox", 'tenant="bench" user="first-render"'),
        ("notifyd-chat", 'tenant="bench" user="first-render" peer="someone"'),
    ):
        page_url = pages.add(host_page(url, element, attributes, token))
        times = []
        for _ in range(loads):
            context = await browser.new_context()  # nothing cached: modules fetched afresh
            page = await context.new_page()
            await page.goto(page_url)
            await page.wait_for_function("window.firstRender !== undefined", timeout=10_000)
            times.append(float(await page.evaluate("window.firstRender")))
            await context.close()
        figures[element] = {
            "median_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1),
            "loads": loads,
        }
    return figures


async def send_many(
    session: aiohttp.ClientSession, url: str, token: str, user: str, count: int
) -> None:
    numbers = iter(range(count))

    async def sender() -> None:
        for n in numbers:
            body = {
                "notification_type": "in_app",
                "recipient": user,
                "subject": f"Notification {n}",
                "message": f"Item {n} of the scroll benchmark",
            }
            async with session.post(
                f"{url}/notifications/send/",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as response:
                if response.status != 202:
                    raise BenchError(f"send: {response.status} {await response.text()}")

    await asyncio.gather(*(sender() for _ in range(SEND_CONCURRENCY)))


async def scroll(
    browser: Any, pages: HostPages, url: str, tenant: str, user: str, token: str, count: int
) -> Any:
    page = await (await browser.new_context(viewport={"width": 900, "height": 800})).new_page()
    html = host_page(url, "notifyd-inbox", f'tenant="{tenant}" user="{user}"', token)
    await page.goto(pages.add(html))
    await page.wait_for_function(
        "document.querySelector('notifyd-inbox').dataset.state === 'live'", timeout=10_000
    )
    await page.locator('notifyd-inbox [part~="bell"]').click()
    await page.evaluate("window.longTasks = []")
    started = time.monotonic()
    shown = await page.evaluate(
        """async (count) => {
            const root = document.querySelector('notifyd-inbox').shadowRoot;
            const scroller = root.querySelector('.scroll');
            const items = () => root.querySelectorAll('[part~="item"]').length;
            const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
            const deadline = performance.now() + 60000;
            while (items() < count && performance.now() < deadline) {
                scroller.scrollTop += 400;
                await frame();
            }
            while (scroller.scrollTop > 0) {
                scroller.scrollTop -= 400;
                await frame();
            }
            return items();
        }""",
        count,
    )
    seconds = time.monotonic() - started
    await page.wait_for_timeout(200)  # (the observer reports a task after it ended)
    tasks: list[float] = await page.evaluate("window.longTasks")
    return {
        "notifications": count,
        "items_shown": shown,
        "long_tasks": len(tasks),
        "longest_task_ms": round(max(tasks, default=0.0), 1),
        "scroll_s": round(seconds, 2),
    }


async def main(options: UiOptions) -> dict[str, Any]:
    from playwright.async_api import async_playwright  # a dev dependency, like the tests'

    url = options.url.rstrip("/")
    require_loopback_url(url, "--url")
    minter = TokenMinter(options.jwt_secret)
    run = secrets.token_hex(3)
    tenant, user = f"bench-{run}", f"bench-{run}-reader"
    reader = minter.mint(tenant_id=tenant, user_id=user, role="user", ttl=3600)
    sender = minter.mint(tenant_id=tenant, user_id=f"bench-{run}-sender", role="service", ttl=3600)
    first = minter.mint(tenant_id="bench", user_id="first-render", role="user", ttl=3600)
    async with aiohttp.ClientSession() as session:
        weights = await sizes(session, url)
        log(f"sending {options.notifications} notifications to {tenant}/{user}")
        await send_many(session, url, sender, user, options.notifications)
    async with async_playwright() as playwright, HostPages(options.page_port) as pages:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            renders = await first_renders(browser, pages, url, first, options.loads)
            scrolled = await scroll(
                browser, pages, url, tenant, user, reader, options.notifications
            )
            version = browser.version
        finally:
            await browser.close()
    return {
        "workload": "ui",
        "sizes": weights,
        "first_render": renders,
        "scroll": scrolled,
        "chromium": version,
        "machine": machine(),
    }
