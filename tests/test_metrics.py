"""/metrics on a real daemon, parsed as Prometheus parses it.

Promises checked (each test names its own): every family the operators' issue asks for is
exposed with its type; HTTP requests are counted and timed by route template; a retried then
sent email counts one retry and one send; a delivery failed for good, a poison entry and an
entry redelivered past its limit each count one dead letter with their cause, and the
dead-letter stream's length is exposed; stream length, pending and lag per consumer group
follow a real backlog behind a stalled SMTP relay and agree with Redis; the refresh period is
a validated setting.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from notifyd.actors.sender import READ_AHEAD
from notifyd.settings import SettingsError
from tests.conftest import DaemonFactory
from tests.helpers import Api, make_settings, wait_for
from tests.smtp_sink import SmtpSink

INTENTS = "notifyd:intents"
DELIVER_EMAIL = "notifyd:deliver:email"
DELIVER_IN_APP = "notifyd:deliver:in_app"
DEAD = "notifyd:dead"

FAST = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
    "NOTIFYD_STREAM_STATS_INTERVAL": "0.05",
}

# name → type, for what the issue asks /metrics to cover
CATALOGUE = {
    "notifyd_build_info": "gauge",
    "notifyd_http_requests": "counter",
    "notifyd_http_request_duration_seconds": "histogram",
    "notifyd_http_requests_in_flight": "gauge",
    "notifyd_deliveries": "counter",
    "notifyd_provider_seconds": "histogram",
    "notifyd_dead_letters": "counter",
    "notifyd_stream_length": "gauge",
    "notifyd_stream_pending": "gauge",
    "notifyd_stream_lag": "gauge",
    "notifyd_reminders": "counter",
    "notifyd_reminder_lateness_ms": "histogram",
    "notifyd_ws_connections": "gauge",
    "notifyd_ws_messages_in": "counter",
    "notifyd_ws_messages_out": "counter",
    "notifyd_actor_restarts": "counter",
}


async def scrape(api: Api) -> dict[str, Metric]:
    status, text, headers = await api.get("/metrics", auth=False)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float | None:
    """The value of the one sample with this name and exactly these labels, if exposed."""
    for family in families.values():
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return None


async def wait_value(api: Api, sample: str, expected: float, **labels: str) -> None:
    seen: list[float | None] = []

    async def reached() -> bool:
        seen.append(value(await scrape(api), sample, **labels))
        return seen[-1] == expected

    try:
        await wait_for(reached, timeout=20)
    except AssertionError:
        raise AssertionError(f"{sample}{labels} stayed {seen[-1]}, not {expected}") from None


async def send(api: Api, channel: str = "email", recipient: str = "c@example.com") -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": channel, "recipient": recipient, "subject": "Hi", "message": "x"},
        role="service",
        user="backend",
    )
    assert status == 202, body
    return str(body["notification_id"])


# --- the catalogue ------------------------------------------------------------------------------


async def test_every_family_the_issue_asks_for_is_exposed_with_its_type(api: Api) -> None:
    """Promise: HTTP, deliveries, provider latency, dead letters, streams, reminders,
    WebSockets, actor restarts and build info are all in /metrics with the right type, and
    build info says which version runs."""
    families = await scrape(api)
    for name, kind in CATALOGUE.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
    [build] = families["notifyd_build_info"].samples
    assert build.value == 1
    assert set(build.labels) == {"version", "python"}
    assert build.labels["version"]


async def test_http_requests_are_counted_and_timed_by_route_template(api: Api) -> None:
    """Promise: a request is counted under its route template, method and status, and its
    latency lands in the histogram under the same route."""
    for _ in range(2):
        status, _, _ = await api.get("/notifications/")
        assert status == 200
    families = await scrape(api)
    labels = {"route": "/notifications/", "method": "GET"}
    assert value(families, "notifyd_http_requests_total", **labels, status="200") == 2
    assert value(families, "notifyd_http_request_duration_seconds_count", **labels) == 2
    assert value(families, "notifyd_http_request_duration_seconds_bucket", **labels, le="+Inf") == 2


async def test_a_method_made_up_by_the_client_is_labelled_other(api: Api) -> None:
    """Promise: the series stay bounded whatever a client sends: a method notifyd serves
    nowhere (WebDAV's, which the HTTP parser lets through; aiohttp's pure-Python parser
    takes any token) is counted as "other", not as a new series and cached child each."""
    for made_up in ("PROPFIND", "MKCOL"):
        status, _, _ = await api.request(made_up, "/notifications/")
        assert status == 405
    families = await scrape(api)
    methods = {sample.labels["method"] for sample in families["notifyd_http_requests"].samples}
    assert "other" in methods
    assert not methods & {"PROPFIND", "MKCOL"}


async def group_infos(redis: Redis, stream: str) -> list[dict[str, Any]]:
    """XINFO GROUPS; none while the stream is not made yet."""
    if not await redis.exists(stream):
        return []
    infos: Any = await redis.xinfo_groups(stream)
    return [dict(info) for info in infos]


# --- retries and dead letters -------------------------------------------------------------------


async def test_a_retried_then_sent_email_counts_one_retry_and_one_send(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink
) -> None:
    """Promise: retries are counted as deliveries with outcome "retrying", sends as "sent",
    and the provider's latency is observed for both attempts."""
    smtp_sink.fail_next(1, "421 4.3.2 Service busy, try again later")
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port), **FAST)
    async with Api(daemon) as api:
        await send(api)
        await wait_value(api, "notifyd_deliveries_total", 1, channel="email", outcome="sent")
        families = await scrape(api)
    assert value(families, "notifyd_deliveries_total", channel="email", outcome="retrying") == 1
    assert value(families, "notifyd_deliveries_total", channel="email", outcome="failed") is None
    assert value(families, "notifyd_provider_seconds_count", channel="email") == 2


async def test_a_delivery_failed_for_good_counts_a_dead_letter(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink
) -> None:
    """Promise: a permanent provider error counts one dead letter of cause "failed" on its
    delivery stream, and the dead-letter stream's length shows it."""
    smtp_sink.fail_next(1, "550 5.7.1 Message rejected as spam")
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port), **FAST)
    async with Api(daemon) as api:
        await send(api)
        await wait_value(api, "notifyd_dead_letters_total", 1, stream=DELIVER_EMAIL, cause="failed")
        await wait_value(api, "notifyd_stream_length", 1, stream=DEAD)
        families = await scrape(api)
    assert value(families, "notifyd_deliveries_total", channel="email", outcome="failed") == 1


@pytest.mark.parametrize("stream", [DELIVER_IN_APP, INTENTS, "notifyd:reminders"])
async def test_a_poison_entry_counts_a_dead_letter_of_cause_poison(
    daemon_factory: DaemonFactory, redis: Redis, stream: str
) -> None:
    """Promise: an entry a consumer (sender, dispatcher, reminder firer) cannot parse is
    dead-lettered and counted as "poison"."""
    daemon = await daemon_factory(**FAST)
    await redis.xadd(stream, {"garbage": "entry"})
    async with Api(daemon) as api:
        await wait_value(api, "notifyd_dead_letters_total", 1, stream=stream, cause="poison")
        await wait_value(api, "notifyd_stream_length", 1, stream=DEAD)


async def test_an_entry_redelivered_past_its_limit_counts_a_dead_letter_of_cause_redelivered(
    daemon_factory: DaemonFactory, redis: Redis
) -> None:
    """Promise: an entry delivered more often than its limit (its handlers kept dying) is
    dead-lettered when taken over, and counted as "redelivered"."""
    daemon = await daemon_factory(**FAST)

    async def group_made() -> bool:
        return any(g["name"] == b"send" for g in await group_infos(redis, DELIVER_IN_APP))

    await wait_for(group_made)
    # A consumer that died holding the entry after many deliveries: read in the same MULTI as
    # the XADD, so the daemon cannot read it first, then marked delivered 50 times, long idle.
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(DELIVER_IN_APP, {"v": "1", "data": "{}"})
        pipe.xreadgroup("send", "dead-consumer", {DELIVER_IN_APP: ">"}, count=1)
        entry_id, _ = await pipe.execute()
    await redis.xclaim(
        DELIVER_IN_APP, "send", "dead-consumer", 0, [entry_id], idle=600_000, retrycount=50
    )
    async with Api(daemon) as api:
        await wait_value(
            api, "notifyd_dead_letters_total", 1, stream=DELIVER_IN_APP, cause="redelivered"
        )
    entries: Any = await redis.xrange(DEAD)
    [(_, dead)] = entries
    assert dead[b"entry"] == entry_id


# --- streams --------------------------------------------------------------------------------------


class StalledRelay:
    """A TCP server that accepts connections and never says a word: a hung SMTP relay."""

    def __init__(self) -> None:
        self.connections: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.append(writer)

        self._server = await asyncio.start_server(hold, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Drop every held connection, so the stuck sends fail fast instead of timing out."""
        assert self._server is not None
        self._server.close()
        for writer in self.connections:
            writer.close()
        await self._server.wait_closed()


async def group_info(redis: Redis, stream: str, group: str) -> dict[str, Any]:
    [info] = [i for i in await group_infos(redis, stream) if i["name"] == group.encode()]
    return info


async def test_stream_length_pending_and_lag_follow_a_backlog_and_agree_with_redis(
    daemon_factory: DaemonFactory, redis: Redis
) -> None:
    """Promise: behind a hung SMTP relay with one email in flight at a time, /metrics shows
    the email stream's length, its send group's pending entries (the one in flight and those
    read ahead into the fair gate: READ_AHEAD per slot) and lag (the two not read yet, 2), as
    Redis itself reports them; the dispatch group is caught
    up (pending 0, lag 0), and the intents stream's length is Redis's (the sending process
    dispatches its own rows, but one it is too busy for goes on the stream); the dead-letter
    stream is measured too (0)."""
    relay = StalledRelay()
    port = await relay.start()
    try:
        daemon = await daemon_factory(
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(port),
            NOTIFYD_EMAIL_CONCURRENCY="1",
            # the one send in flight stays stuck for the whole test (until relay.close())
            NOTIFYD_SEND_TIMEOUT="30",
            NOTIFYD_SMTP_CONNECT_TIMEOUT="30",
            NOTIFYD_CLAIM_IDLE="60",
            NOTIFYD_SHUTDOWN_TIMEOUT="40",
            NOTIFYD_STREAM_STATS_INTERVAL="0.05",
        )
        async with Api(daemon) as api:
            total = READ_AHEAD + 2  # one slot: READ_AHEAD entries are read, two wait unread
            for i in range(total):
                await send(api, recipient=f"c{i}@example.com")

            async def one_connected() -> bool:
                return len(relay.connections) == 1

            await wait_for(one_connected)
            send_group = {"stream": DELIVER_EMAIL, "group": "send"}
            await wait_value(api, "notifyd_stream_length", total, stream=DELIVER_EMAIL)
            await wait_value(api, "notifyd_stream_lag", 2, **send_group)
            await wait_value(api, "notifyd_stream_pending", READ_AHEAD, **send_group)
            await wait_value(api, "notifyd_stream_lag", 0, stream=INTENTS, group="dispatch")
            await wait_value(api, "notifyd_stream_pending", 0, stream=INTENTS, group="dispatch")
            families = await scrape(api)
            truth = await group_info(redis, DELIVER_EMAIL, "send")
            assert truth["lag"] == value(families, "notifyd_stream_lag", **send_group)
            assert truth["pending"] == value(families, "notifyd_stream_pending", **send_group)
            assert value(families, "notifyd_stream_length", stream=DEAD) == 0
            # the sending process dispatches its own rows; one it was too busy for went on
            # the intents stream, and was read from there (the dispatch group is caught up)
            assert value(families, "notifyd_stream_length", stream=INTENTS) == await redis.xlen(
                INTENTS
            )
            assert len(relay.connections) == 1  # still one in flight: the backlog is real
    finally:
        await relay.close()


def test_the_stream_stats_period_is_a_validated_setting() -> None:
    """Promise: NOTIFYD_STREAM_STATS_INTERVAL must be positive, and the error names it."""
    database_url, redis_url = "postgresql://u@127.0.0.1/db", "redis://127.0.0.1:6379/0"
    with pytest.raises(SettingsError) as raised:
        make_settings(database_url, redis_url, NOTIFYD_STREAM_STATS_INTERVAL="0")
    assert any("NOTIFYD_STREAM_STATS_INTERVAL" in p for p in raised.value.problems)
    settings = make_settings(database_url, redis_url, NOTIFYD_STREAM_STATS_INTERVAL="2.5")
    assert settings.stream_stats_interval == 2.5
