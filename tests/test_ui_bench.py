"""`python -m bench ui` measures what docs/benchmarks.md reports of the web components: the
modules' bytes and gzip bytes as served, the time to first render, and an inbox of N
notifications scrolled to its end and back while long tasks are recorded."""

from __future__ import annotations

import gzip
from typing import Any

from bench import ui
from bench.common import free_port
from notifyd.ui import asset
from tests.conftest import DaemonFactory
from tests.helpers import TEST_JWT_SECRET
from tests.ui_browser import needs_chromium


@needs_chromium
async def test_ui_reports_sizes_first_render_and_a_scroll_through_every_notification(
    daemon_factory: DaemonFactory,
) -> None:
    page_port = free_port()
    daemon = await daemon_factory(NOTIFYD_ALLOWED_ORIGINS=f"http://127.0.0.1:{page_port}")
    result: dict[str, Any] = await ui.main(
        ui.UiOptions(
            url=f"http://127.0.0.1:{daemon.port}",
            jwt_secret=TEST_JWT_SECRET,
            loads=1,
            notifications=70,  # three pages of 30
            page_port=page_port,
        )
    )
    assert result["workload"] == "ui"
    inbox = asset("notifyd-inbox.js").body
    assert result["sizes"]["notifyd-inbox.js"] == {
        "bytes": len(inbox),
        "gzip_bytes": len(gzip.compress(inbox, 9)),
    }
    for element in ("notifyd-inbox", "notifyd-chat"):
        assert 0 < result["first_render"][element]["median_ms"] < 10_000
    scrolled = result["scroll"]
    assert scrolled["items_shown"] == scrolled["notifications"] == 70
    assert scrolled["long_tasks"] >= 0 and scrolled["longest_task_ms"] >= 0
