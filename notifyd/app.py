"""Composition root: opens every resource, builds the actors and the web app, runs to a signal.

Everything is opened in one `AsyncExitStack` so that shutdown closes it in reverse order, also
when start-up fails half way. Nothing here is global: tests run several daemons in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis

from notifyd.accept.outbox import Outbox
from notifyd.actors.housekeeper import Housekeeper, Retention
from notifyd.auth.tokens import TokenVerifier
from notifyd.egress import Egress
from notifyd.health import all_ok, check_dependencies
from notifyd.http.context import Services
from notifyd.http.server import build_app
from notifyd.ids import OpaqueIdRule
from notifyd.ingest.kafka_delivery_events import set_capture
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.pipeline import Pipeline, build_pipeline, consumer_name
from notifyd.realtime import pubsub
from notifyd.realtime.chat import Chat
from notifyd.realtime.hub import Hub
from notifyd.realtime.presence import Presence
from notifyd.realtime.seats import SocketSeats
from notifyd.settings import Settings
from notifyd.store import migrate
from notifyd.store.pool import close_pool, create_pool
from notifyd.supervisor import Actor, Supervisor
from notifyd.systemd import SystemdNotifier

log = logging.getLogger("notifyd.app")

OUTBOX_GRACE = 2.0  # seconds a shutdown waits for batches being dispatched in process


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


def _is_unix_socket(url: str) -> bool:
    """`unix:///path/to/redis.sock`, as redis-py reads it (the scheme in any case)."""
    return urlsplit(url).scheme.lower() == "unix"


class Daemon:
    """One notifyd instance: `start()`, then `run_until_stopped()` or `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        notifier: SystemdNotifier | None = None,
        extra_actors: list[Actor] | None = None,
        egress: Egress | None = None,
    ) -> None:
        """`egress`: the policy for tenants' own relays, by default the settings' (tests
        pass one whose resolver they control)."""
        self.settings = settings
        self.metrics = Metrics()
        self.notifier = notifier or SystemdNotifier()
        self._extra_actors = extra_actors or []
        self.egress = egress or Egress.from_settings(settings)
        self._stack = AsyncExitStack()
        self._stack.callback(self.egress.close)  # the last thing unwound
        self._runner: web.AppRunner | None = None
        self._stop_requested = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self.supervisor: Supervisor | None = None
        self.pipeline: Pipeline | None = None
        self.services: Services | None = None
        self.port: int = settings.port
        self.stopped = False

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        s = self.settings
        try:
            pool = await create_pool(s)  # the API's
            self._stack.push_async_callback(close_pool, pool)
            queue_pool = await create_pool(s, queue=True)  # the actors' (see store.pool)
            self._stack.push_async_callback(close_pool, queue_pool)
            keyed_pool = await create_pool(s, keyed=True)  # the dispatcher's batches by key
            self._stack.push_async_callback(close_pool, keyed_pool)
        except (OSError, Exception) as exc:
            raise StartupError(f"cannot connect to PostgreSQL (DATABASE_URL): {exc}") from exc
        async with pool.acquire() as conn:
            missing = await migrate.pending(conn)
        if missing:
            raise StartupError(
                f"the database schema is behind ({', '.join(missing)} not applied); "
                "run `notifyd migrate` first"
            )
        # status changes are captured for the Kafka topic only where one is configured
        await set_capture(pool, bool(s.kafka_events_topic))
        # a blocking pool: a thousand sockets closing at once wait for a connection
        # instead of failing with "too many connections". Every wait is bounded by
        # NOTIFYD_REDIS_TIMEOUT: the free connection, connecting, and each command's reply
        # (a hung Redis raises redis.exceptions.TimeoutError: an actor's crash and
        # restart, a request's 503). Longer than any XREADGROUP BLOCK (settings check it).
        redis = Redis.from_pool(
            BlockingConnectionPool.from_url(
                s.effective_redis_url,
                max_connections=s.redis_max_connections,
                timeout=s.redis_timeout,
                health_check_interval=30,
                socket_connect_timeout=s.redis_timeout,
                socket_timeout=s.redis_timeout,
                # TCP keepalive finds a peer that vanished; a Unix socket has no such option
                **({} if _is_unix_socket(s.effective_redis_url) else {"socket_keepalive": True}),
            )
        )
        self._stack.push_async_callback(redis.aclose)
        try:
            await redis.ping()
        except Exception as exc:
            raise StartupError(f"cannot reach Redis (REDIS_URL/REDIS_HOST): {exc}") from exc
        http_session = aiohttp.ClientSession()
        self._stack.push_async_callback(http_session.close)

        id_rule = OpaqueIdRule.from_settings(s.id_max_length, s.id_pattern)
        keys = Keys(s.redis_prefix)
        pipeline = build_pipeline(
            s,
            queue_pool,
            redis,
            keys,
            self.metrics,
            self.egress,
            http_session,
            keyed_pool=keyed_pool,
        )
        self.pipeline = pipeline
        self._stack.push_async_callback(pipeline.close)
        hub = Hub(
            functools.partial(
                pubsub.connect, s.effective_redis_url, connect_timeout=s.redis_timeout
            ),
            keys,
            self.metrics,
            poll=s.stream_block,
            # a PING every NOTIFYD_REDIS_TIMEOUT: a hung Redis is found within two of them
            ping_every=s.redis_timeout,
        )
        presence = Presence(redis, keys, ttl=s.ws_presence_ttl)
        seats = SocketSeats(redis, keys, ttl=s.ws_presence_ttl)
        tenant_limits = pipeline.tenant_limits
        await tenant_limits.load()  # the first sends already see the operator's overrides
        self._stack.push_async_callback(tenant_limits.close)
        actors: list[Actor] = [
            hub,
            presence,
            seats,
            *pipeline.actors,
            Housekeeper(
                queue_pool,
                ttl=s.idempotency_ttl,
                interval=s.sweep_interval,
                redis=redis,
                groups=keys.consumer_groups(),
                event_ttl=s.event_dedupe_ttl,
                retention=Retention(
                    notifications=s.retain_notifications,
                    messages=s.retain_messages,
                    reminders=s.retain_reminders,
                    audit=s.retain_audit,
                    workflow_runs=s.retain_workflow_runs,
                    webhook_deliveries=s.retain_webhook_deliveries,
                    batch=s.retain_batch,
                    pause=s.retain_pause,
                ),
                metrics=self.metrics,
            ),
            *self._extra_actors,
        ]

        def on_restart(name: str) -> None:
            self.metrics.actor_restarts.labels(name).inc()
            pipeline.alerts.raise_alert(
                f"actor-restart:{name}",
                f"notifyd: actor {name} crashed and was restarted",
                f"The {name} actor of instance {consumer_name(s)} crashed and is restarting. "
                "The log has the traceback; /readyz shows the actors' state.",
            )

        supervisor = Supervisor(
            actors,
            on_restart=on_restart,
            backoff_cap=s.actor_backoff_cap,
            max_restarts=s.actor_max_restarts,
            restart_window=s.actor_restart_window,
        )
        self.supervisor = supervisor
        # Unwinding is last-in first-out: the listener closes and in-flight requests finish
        # (runner.cleanup, pushed below) before the actors are asked to stop.
        self._stack.push_async_callback(supervisor.stop, s.shutdown_timeout)
        outbox = Outbox(
            pool,
            pipeline.producer,
            keys,
            self.metrics,
            dispatch_now=pipeline.dispatcher.dispatch_now,
            commit_timeout=s.commit_timeout,
        )
        # after the requests (runner.cleanup), before the actors and the pools; briefly: a
        # batch dispatches in milliseconds, and what a stuck one leaves is the sweeper's
        self._stack.push_async_callback(outbox.close, OUTBOX_GRACE)
        services = Services(
            settings=s,
            pool=pool,
            redis=redis,
            producer=pipeline.producer,
            outbox=outbox,
            schedule=pipeline.schedule,
            hub=hub,
            history=pipeline.history,
            chat=Chat(pool, pipeline.history, max_batch=s.chat_write_batch),
            presence=presence,
            keys=keys,
            metrics=self.metrics,
            verifier=TokenVerifier(s, id_rule, http_session),
            id_rule=id_rule,
            tenant_settings=pipeline.tenant_settings,
            egress=self.egress,
            actors_healthy=lambda: supervisor.healthy,
            actors_status=supervisor.status,
            limiter=pipeline.limiter,
            tenant_limits=tenant_limits,
            seats=seats,
        )
        self.services = services
        app = build_app(services)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=s.shutdown_timeout
        )
        await runner.setup()
        self._runner = runner
        self._stack.push_async_callback(runner.cleanup)
        sock = socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((s.host, s.port))
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
        self.port = sock.getsockname()[1]
        site = web.SockSite(runner, sock)
        await site.start()
        supervisor.start()
        self.notifier.notify(
            f"READY=1\nSTATUS=serving on {s.host}:{self.port}\nMAINPID={os.getpid()}"
        )
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.create_task(
                self._feed_watchdog(interval, pool, redis), name="watchdog"
            )
        log.info("notifyd serving", extra={"host": s.host, "port": self.port})

    async def _feed_watchdog(self, interval: float, pool: asyncpg.Pool, redis: Redis) -> None:
        """WATCHDOG=1 only while every actor is healthy and PostgreSQL and Redis answer
        within the deadline: a stuck daemon, or one whose dependency hangs, gets restarted
        by systemd (fresh connections, which a failed-over server may need). The check is
        bounded by the interval, so pings of a healthy daemon never drift past
        WatchdogSec; it costs one `SELECT 1` and one PING per interval."""
        deadline = min(self.settings.ready_timeout, interval)
        while True:
            if (
                self.supervisor is not None
                and self.supervisor.healthy
                and all_ok(await check_dependencies(pool, redis, deadline))
                and self.supervisor.healthy
            ):
                self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run_until_stopped(self) -> int:
        """Wait for a stop request or a fatal actor failure; shut down; return the exit code."""
        assert self.supervisor is not None
        stop_wait = asyncio.create_task(self._stop_requested.wait())
        fatal_wait = asyncio.create_task(self.supervisor.fatal.wait())
        await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stop_wait, fatal_wait):
            waiter.cancel()
        await asyncio.gather(stop_wait, fatal_wait, return_exceptions=True)
        fatal = self.supervisor.fatal.is_set()
        await self.stop()
        if fatal:
            log.critical(
                "exiting after an actor exceeded its restart budget",
                extra={"reason": self.supervisor.fatal_reason},
            )
            return 1
        return 0

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), stop actors, close all."""
        self.notifier.notify("STOPPING=1")
        log.info("notifyd stopping")
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self._stack.aclose()
        self.stopped = True
        log.info("notifyd stopped")


async def serve(settings: Settings) -> int:
    """Run one daemon until SIGTERM/SIGINT; a second signal forces an immediate exit."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(settings)
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            raise SystemExit(130)
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        daemon.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await daemon.start()
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 2
    # What startup made (modules, the app and its routes, pools, compiled scripts) lives as
    # long as the process. Frozen, the collector stops walking it again on each full
    # collection; under load those walks were pauses that set the p99 of every request
    # (docs/benchmarks.md).
    gc.collect()  # what startup left in cycles goes now, not into the frozen set for good
    gc.freeze()
    # A full collection walks every open socket's objects (a long pause with many open),
    # and one comes each time the objects moved to the oldest generation since the last
    # reach a quarter of it. Young collections every 700 allocations moved whatever requests
    # were in flight, so with many sockets and REST load full collections came every few
    # seconds and set the p99. Every 50,000, most of those objects are gone before they are
    # looked at and full collections stop; a young collection costs a little more
    # (docs/benchmarks.md).
    gc.set_threshold(50_000, 20, 10)
    return await daemon.run_until_stopped()
