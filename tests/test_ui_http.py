"""How notifyd serves the web components, and CORS for host pages on other origins.

The modules are cacheable and versioned; only the origins in NOTIFYD_ALLOWED_ORIGINS get
CORS (on /ui/ and the REST routes the components call) and pass the WebSocket Origin check
(NOTIFYD_WS_ALLOWED_ORIGINS still works: the older name of the same setting).
"""

from __future__ import annotations

import aiohttp
import pytest

from notifyd.ui import COMPONENTS, asset
from tests.conftest import DaemonFactory
from tests.helpers import Api, token

APP = "https://app.example.com"
EVIL = "https://evil.example.com"


@pytest.mark.parametrize("name", COMPONENTS)
async def test_a_component_is_served_versioned_and_cacheable(api: Api, name: str) -> None:
    path = f"/ui/{name}"
    status, body, headers = await api.get(path, auth=False)
    assert status == 200
    assert headers["Content-Type"].startswith("text/javascript")
    assert body.encode() == asset(name).body
    assert headers["ETag"] == f'"{asset(name).version}"'
    assert headers["Cache-Control"] == "no-cache"  # an unversioned URL revalidates
    assert headers["Vary"] == "Origin"  # answered with CORS headers or without, by Origin

    status, _, headers = await api.get(f"{path}?v={asset(name).version}", auth=False)
    assert status == 200
    assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
    status, _, _ = await api.get(path, auth=False, headers={"If-None-Match": headers["ETag"]})
    assert status == 304


async def test_the_demo_page_is_served_only_in_debug(
    api: Api, daemon_factory: DaemonFactory
) -> None:
    status, body, headers = await api.get("/ui/demo", auth=False)
    assert status == 404
    assert headers["Content-Type"] == "application/problem+json"
    debug = await daemon_factory(DEBUG="true")
    async with Api(debug) as debug_api:
        status, body, headers = await debug_api.get("/ui/demo", auth=False)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    assert f"/ui/notifyd-inbox.js?v={asset('notifyd-inbox.js').version}" in body
    assert f"/ui/notifyd-chat.js?v={asset('notifyd-chat.js').version}" in body
    assert "<notifyd-inbox" in body and "<notifyd-chat" in body


@pytest.mark.parametrize("env", ["NOTIFYD_ALLOWED_ORIGINS", "NOTIFYD_WS_ALLOWED_ORIGINS"])
async def test_cors_for_the_allowed_origins_only(daemon_factory: DaemonFactory, env: str) -> None:
    daemon = await daemon_factory(**{env: APP})
    async with Api(daemon) as api:
        for path in ("/ui/notifyd-inbox.js", "/notifications/", "/api/notifications/"):
            status, _, headers = await api.get(path, headers={"Origin": APP})
            assert status == 200, path
            assert headers["Access-Control-Allow-Origin"] == APP
            assert headers.getall("Vary") == ["Origin"]
            assert "X-Unread-Count" in headers["Access-Control-Expose-Headers"]
            assert "Link" in headers["Access-Control-Expose-Headers"]
            status, _, headers = await api.get(path, headers={"Origin": EVIL})
            assert status == 200
            assert "Access-Control-Allow-Origin" not in headers
        # a refusal reaches the page readable: CORS wraps the problem too
        status, _, headers = await api.get("/notifications/", auth=False, headers={"Origin": APP})
        assert status == 401
        assert headers["Access-Control-Allow-Origin"] == APP

        preflight = {"Origin": APP, "Access-Control-Request-Method": "POST"}
        status, _, headers = await api.request(
            "OPTIONS", "/notifications/mark-as-read/", auth=False, headers=preflight
        )
        assert status == 204
        assert headers["Access-Control-Allow-Origin"] == APP
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        assert "POST" in headers["Access-Control-Allow-Methods"]
        status, _, headers = await api.request(
            "OPTIONS",
            "/notifications/mark-as-read/",
            auth=False,
            headers={**preflight, "Origin": EVIL},
        )
        assert "Access-Control-Allow-Origin" not in headers
        # routes the components do not use get no CORS, whoever asks
        status, _, headers = await api.get("/audit/", role="admin", headers={"Origin": APP})
        assert "Access-Control-Allow-Origin" not in headers

        url = f"ws://127.0.0.1:{daemon.port}/ws/notifications/TEN-0001/user-1/"
        bearer = token(daemon.settings)
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(f"{url}?token={bearer}", headers={"Origin": EVIL})
            async with session.ws_connect(f"{url}?token={bearer}", headers={"Origin": APP}) as ws:
                assert not ws.closed
