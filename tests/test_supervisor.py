"""The supervisor: crashing actors are restarted with capped backoff, counted, and reported.

Promises (DESIGN.md "Shape: supervised actors"): an actor that crashes is restarted with capped
exponential backoff and the restart is counted in a metric; readiness reflects actors in
backoff; one failing actor never takes the process down, but past a restart budget the
supervisor gives up (so systemd takes over); shutdown is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import aiohttp
import pytest

from notifyd.app import Daemon
from notifyd.settings import Settings
from notifyd.supervisor import Actor, Supervisor, exponential_backoff, sleep_or_stop
from tests.helpers import wait_for


class Crasher:
    """Raises on every run while `broken`; otherwise runs until asked to stop."""

    def __init__(self, name: str = "crasher", *, broken: bool = True, crash_first: int = 0):
        self.name = name
        self.broken = broken
        self.crash_first = crash_first
        self.runs = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.broken or self.runs <= self.crash_first:
            raise RuntimeError(f"{self.name} broke (run {self.runs})")
        await stop.wait()


class Steady:
    """Runs until asked to stop, and says when it started and stopped."""

    def __init__(self, name: str = "steady") -> None:
        self.name = name
        self.runs = 0
        self.stopped = False

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        await stop.wait()
        self.stopped = True


class Deaf:
    """Ignores the stop event; only cancellation ends it."""

    name = "deaf"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = False

    async def run(self, stop: asyncio.Event) -> None:
        self.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Quitter:
    """Returns at once without stop being set: that is a crash, not a clean exit."""

    name = "quitter"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1


def fast_supervisor(
    actors: list[Actor],
    restarts: list[str] | None = None,
    *,
    backoff_base: float = 0.01,
    backoff_cap: float = 0.05,
    max_restarts: int = 20,
    restart_window: float = 60.0,
) -> Supervisor:
    """A supervisor with tiny backoffs, reporting restarts into `restarts`."""
    return Supervisor(
        actors,
        on_restart=restarts.append if restarts is not None else None,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        max_restarts=max_restarts,
        restart_window=restart_window,
    )


async def test_crashing_actor_is_restarted_and_each_restart_reported() -> None:
    """An actor that raises is run again and again; on_restart gets its name each time."""
    actor = Crasher()
    restarts: list[str] = []
    sup = fast_supervisor([actor], restarts)
    sup.start()
    try:
        await wait_for(lambda: _true(actor.runs >= 3), timeout=5)
    finally:
        await sup.stop(grace=2)
    assert not sup.fatal.is_set()
    # on_restart is called right before each re-run, never for the first run
    assert restarts == ["crasher"] * (actor.runs - 1)


async def test_healthy_is_false_during_backoff_and_true_once_all_run() -> None:
    """Readiness: an actor waiting out its backoff makes the supervisor unhealthy."""
    flaky = Crasher("flaky", broken=False, crash_first=1)
    steady = Steady()
    # a backoff long enough (0.25 to 0.5 s) to observe the unhealthy window
    sup = Supervisor([flaky, steady], backoff_base=0.5, backoff_cap=0.5)
    assert not sup.healthy  # nothing started yet
    sup.start()
    try:
        await wait_for(lambda: _true(flaky.runs == 1 and steady.runs == 1), timeout=5)
        assert not sup.healthy
        assert sup.status() == {"flaky": "restarting", "steady": "running"}
        await wait_for(lambda: _true(sup.healthy), timeout=5)
        assert flaky.runs == 2
        assert sup.status() == {"flaky": "running", "steady": "running"}
    finally:
        await sup.stop(grace=2)
    assert not sup.healthy  # stopped actors are not running


async def test_restart_budget_exceeded_sets_fatal_naming_the_actor() -> None:
    """Past max_restarts crashes within restart_window the supervisor gives up: fatal."""
    actor = Crasher("doomed")
    restarts: list[str] = []
    sup = fast_supervisor([actor], restarts, max_restarts=3, restart_window=60)
    sup.start()
    try:
        await asyncio.wait_for(sup.fatal.wait(), timeout=5)
        assert "doomed" in sup.fatal_reason
        assert not sup.healthy
        # max_restarts restarts were allowed, the crash after them was one too many
        assert actor.runs == 4
        assert restarts == ["doomed"] * 3
    finally:
        await sup.stop(grace=2)


async def test_crashes_outside_the_window_do_not_exhaust_the_budget() -> None:
    """Only crashes within restart_window count toward max_restarts."""
    actor = Crasher("slowcrash")
    # every backoff (>= 0.05 s) is longer than the window (0.01 s): never more than 1 recent crash
    sup = fast_supervisor(
        [actor], backoff_base=0.1, backoff_cap=0.1, max_restarts=1, restart_window=0.01
    )
    sup.start()
    try:
        await wait_for(lambda: _true(actor.runs >= 4), timeout=5)
        assert not sup.fatal.is_set()
    finally:
        await sup.stop(grace=2)


async def test_healthy_sibling_keeps_running_while_another_actor_crashes() -> None:
    """One failing actor never takes the others down."""
    crasher = Crasher()
    steady = Steady()
    sup = fast_supervisor([crasher, steady])
    sup.start()
    try:
        await wait_for(lambda: _true(crasher.runs >= 5), timeout=5)
        assert steady.runs == 1
        assert not steady.stopped
        assert sup.status()["steady"] == "running"
        assert not sup.healthy
    finally:
        await sup.stop(grace=2)
    assert steady.stopped


async def test_stop_returns_promptly_when_actors_honour_the_stop_event() -> None:
    actors = [Steady("a"), Steady("b")]
    sup = fast_supervisor(list(actors))
    sup.start()
    await wait_for(lambda: _true(sup.healthy), timeout=5)
    started = time.monotonic()
    await sup.stop(grace=10)
    assert time.monotonic() - started < 1.0
    assert all(actor.stopped for actor in actors)


async def test_stop_cancels_an_actor_that_ignores_the_stop_event_after_grace() -> None:
    deaf = Deaf()
    steady = Steady()
    sup = fast_supervisor([deaf, steady])
    sup.start()
    await asyncio.wait_for(deaf.started.wait(), timeout=5)
    started = time.monotonic()
    await sup.stop(grace=0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0, elapsed
    assert deaf.cancelled
    assert steady.stopped
    assert not sup.healthy


async def test_stop_while_an_actor_is_in_backoff_returns_at_once() -> None:
    """The backoff sleep is stop-aware: a long backoff does not delay shutdown."""
    actor = Crasher()
    restarts: list[str] = []
    sup = Supervisor([actor], on_restart=restarts.append, backoff_base=30, backoff_cap=30)
    sup.start()
    await wait_for(lambda: _true(actor.runs == 1 and not sup.healthy), timeout=5)
    started = time.monotonic()
    await sup.stop(grace=5)
    assert time.monotonic() - started < 1.0
    assert actor.runs == 1
    assert restarts == []


async def test_actor_returning_without_stop_counts_as_a_crash() -> None:
    actor = Quitter()
    restarts: list[str] = []
    sup = fast_supervisor([actor], restarts)
    sup.start()
    try:
        await wait_for(lambda: _true(len(restarts) >= 2), timeout=5)
        assert set(restarts) == {"quitter"}
        assert actor.runs >= 2
    finally:
        await sup.stop(grace=2)


class StrayCancel:
    """Ends its first run with a CancelledError nobody asked for (a library future cancelled
    under it), then runs normally."""

    name = "stray"

    def __init__(self) -> None:
        self.runs = 0

    async def run(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs == 1:
            raise asyncio.CancelledError
        await stop.wait()


async def test_actor_ending_with_a_stray_cancellation_is_restarted() -> None:
    """Only the supervisor's own cancel stops an actor; any other ending is a crash."""
    actor = StrayCancel()
    sup = fast_supervisor([actor])
    sup.start()
    try:
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: _true(actor.runs >= 2), timeout=2)
        # never report a dead actor as healthy (the watchdog would keep being fed)
        assert actor.runs >= 2 or not sup.healthy
        assert actor.runs >= 2
    finally:
        await sup.stop(grace=2)


def test_exponential_backoff_doubles_and_is_capped() -> None:
    assert exponential_backoff(1, 0.2, 30, jitter=False) == pytest.approx(0.2)
    assert exponential_backoff(2, 0.2, 30, jitter=False) == pytest.approx(0.4)
    assert exponential_backoff(4, 0.2, 30, jitter=False) == pytest.approx(1.6)
    assert exponential_backoff(0, 0.2, 30, jitter=False) == pytest.approx(0.2)
    assert exponential_backoff(20, 0.2, 30, jitter=False) == 30
    assert exponential_backoff(60, 0.2, 30, jitter=False) == 30


def test_exponential_backoff_jitter_stays_within_half_to_full_delay() -> None:
    for attempt, delay in ((1, 0.2), (3, 0.8), (30, 30.0)):
        samples = [exponential_backoff(attempt, 0.2, 30) for _ in range(300)]
        assert all(delay / 2 <= s <= delay for s in samples), (attempt, min(samples), max(samples))
        assert len(set(samples)) > 1  # actually jittered
    capped = [exponential_backoff(25, 1.0, 5.0) for _ in range(300)]
    assert max(capped) <= 5.0


def test_exponential_backoff_is_capped_for_any_attempt_count() -> None:
    """Capped means capped: a very long crash streak still waits `cap`, it does not raise."""
    assert exponential_backoff(5000, 0.2, 30, jitter=False) == 30


async def test_sleep_or_stop_returns_early_when_the_event_is_set() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handle = loop.call_later(0.05, stop.set)
    started = time.monotonic()
    try:
        assert await sleep_or_stop(stop, 30) is True
    finally:
        handle.cancel()
    assert time.monotonic() - started < 1.0


async def test_sleep_or_stop_sleeps_out_the_time_and_answers_false() -> None:
    stop = asyncio.Event()
    started = time.monotonic()
    assert await sleep_or_stop(stop, 0.05) is False
    assert time.monotonic() - started >= 0.04
    stop.set()
    assert await sleep_or_stop(stop, 30) is True  # already set: at once
    assert await sleep_or_stop(asyncio.Event(), -1) is False  # negative means no wait


# ------------------------------------------------------------------ through a real daemon


async def _true(value: bool) -> bool:
    return value


def _restarts(metrics_text: str, actor: str) -> float:
    match = re.search(
        rf'^notifyd_actor_restarts_total\{{actor="{re.escape(actor)}"\}} (\S+)$',
        metrics_text,
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0


async def test_daemon_counts_actor_restarts_and_readyz_fails_while_an_actor_fails(
    settings: Settings,
) -> None:
    """/metrics counts restarts per actor; /readyz answers 503 until the actor runs again."""
    crasher = Crasher("flapper")
    daemon = Daemon(settings, extra_actors=[crasher])
    await daemon.start()
    base = f"http://127.0.0.1:{daemon.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def metrics_text() -> str:
                async with http.get(base + "/metrics") as response:
                    assert response.status == 200
                    return await response.text()

            async def restarted() -> bool:
                return _restarts(await metrics_text(), "flapper") >= 1

            await wait_for(restarted, timeout=10)
            async with http.get(base + "/readyz") as response:
                body = await response.json()
                assert response.status == 503, body
            assert body["checks"]["actors"] == "failing"
            assert body["checks"]["postgresql"] == "ok"
            assert body["checks"]["redis"] == "ok"
            assert body["actors"]["flapper"] == "restarting"
            assert body["actors"]["housekeeper"] == "running"
            # the daemon itself stays up and keeps answering
            async with http.get(base + "/healthz") as response:
                assert response.status == 200

            crasher.broken = False

            async def ready() -> bool:
                async with http.get(base + "/readyz") as response:
                    return response.status == 200

            await wait_for(ready, timeout=10)
            assert _restarts(await metrics_text(), "flapper") >= 1
            assert _restarts(await metrics_text(), "housekeeper") == 0
            assert daemon.supervisor is not None
            assert not daemon.supervisor.fatal.is_set()
    finally:
        await daemon.stop()
