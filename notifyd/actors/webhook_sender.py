"""The webhook sender: delivery rows → signed POSTs to tenants' endpoints, at least once.

The rows are the queue (notifyd/sql/0013_webhooks.sql writes them in the transaction of the
change they report; `store.webhooks` says how they move). A row in PostgreSQL is the whole
promise: a `kill -9` at any point leaves it `pending` (never claimed) or `sending` with a
lease that runs out, and whichever instance claims it next sends it again with the same
`webhook-id`.

No Redis stream: the rows are made by triggers, which cannot XADD, and PostgreSQL already
orders them by due time. The sender wakes on `NOTIFY notifyd_webhooks` (sent at the commit of
a transaction that made rows), when a request of its own ends (a slot is free), and, when it
has none in flight, at the next retry's time; `FALLBACK_POLL_S` (2 s) bounds every other wait
(a retry falling due while requests are in flight, a notification lost with a connection, a
dead instance's lease running out). Per delivery: its share of a claim, the request, and one
statement recording the outcome.

Tenants cost each other nothing:
- each tenant has `NOTIFYD_WEBHOOK_TENANT_CONCURRENCY` requests in flight at most (per
  instance), and the claim walks tenant by tenant, so a tenant whose endpoint hangs holds
  only its own slots while everyone else's rows are claimed past its backlog;
- every attempt is bounded: connect (`NOTIFYD_WEBHOOK_CONNECT_TIMEOUT`) and in all
  (`NOTIFYD_WEBHOOK_TIMEOUT`); at most `NOTIFYD_WEBHOOK_RESPONSE_MAX_BYTES` of the answer
  are read; redirects are not followed (a 3xx is a failure); no proxy from the environment,
  no cookies;
- the egress policy is checked where the connection is made: names through
  `egress.HttpResolver` (aiohttp connects to the very addresses checked: no DNS rebinding),
  IP literals before the request.

What the tenant reads back (`last_error`, the attempt log) names the kind of failure, never an
address a name resolved to; the operator's log has the details. Secrets are opened only to
sign, and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
from yarl import URL

from notifyd import __version__, webhooks
from notifyd.alerts import Alerting
from notifyd.egress import Blocked, Egress, EgressRefused, HttpResolver, ResolveFailed
from notifyd.metrics import Metrics
from notifyd.secretbox import SecretBox, SecretError
from notifyd.settings import Settings
from notifyd.store import webhooks as store
from notifyd.supervisor import exponential_backoff

log = logging.getLogger("notifyd.webhooks")

FALLBACK_POLL_S = 2.0
LEASE_MARGIN_S = 1.0  # a claim outlives the longest attempt (and its record) by this much
RELEASE_TIMEOUT_S = 2.0  # a stop hands its claims back within this, else leaves them
USER_AGENT = f"notifyd/{__version__} (webhooks)"


class _Failed(Exception):
    """An attempt that did not end in a 2xx: what the tenant is told, and the outcome label."""

    def __init__(self, error: str, outcome: str, status_code: int | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.outcome = outcome
        self.status_code = status_code


class WebhookSender:
    name = "webhooks"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        settings: Settings,
        egress: Egress,
        metrics: Metrics,
        alerts: Alerting,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._egress = egress.for_ports(settings.webhook_allowed_ports, "a webhook port")
        self._metrics = metrics
        self._alerts = alerts
        self._box = SecretBox.from_settings(settings)
        self._wake = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], tuple[uuid.UUID, int]] = {}  # → its claim
        self._busy: Counter[str] = Counter()  # tenant → requests in flight here
        self._timeout = aiohttp.ClientTimeout(
            total=settings.webhook_timeout,
            connect=min(settings.webhook_connect_timeout, settings.webhook_timeout),
        )

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(
            resolver=HttpResolver(self._egress),
            use_dns_cache=False,
            limit=self._settings.webhook_concurrency,
        )
        async with (
            aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            ) as http,
            self._pool.acquire() as listener,
        ):
            await listener.add_listener(store.NOTIFY_CHANNEL, self._on_notify)
            try:
                await self._loop(http, listener, stop)
            finally:
                await self._drain()
                if not listener.is_closed():
                    await listener.remove_listener(store.NOTIFY_CHANNEL, self._on_notify)

    async def _loop(self, http: aiohttp.ClientSession, listener: Any, stop: asyncio.Event) -> None:
        s = self._settings
        while not stop.is_set():
            if listener.is_closed():
                raise ConnectionError("the LISTEN connection closed")  # restarted
            self._wake.clear()
            free = s.webhook_concurrency - len(self._tasks)
            claimed = []
            if free > 0:
                claimed = await store.claim(
                    self._pool,
                    self._busy,
                    tenant_cap=s.webhook_tenant_concurrency,
                    limit=free,
                    lease=2 * s.webhook_timeout + LEASE_MARGIN_S,
                    retry_for=s.webhook_retry_for,
                )
                for row in claimed:
                    self._start(http, row)
            if free > 0 and len(claimed) == free:
                continue  # more may be due
            wait = FALLBACK_POLL_S
            if not self._tasks:
                # with requests in flight, each one ending wakes the loop (and a retry due
                # meanwhile waits for that, or FALLBACK_POLL_S at most): no query per wake
                due = await store.next_due(self._pool)
                if due is not None:
                    wait = min(wait, due)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.0)):
                    await _first(stop, self._wake)

    def _start(self, http: aiohttp.ClientSession, row: asyncpg.Record) -> None:
        tenant_id = row["tenant_id"]
        self._busy[tenant_id] += 1
        task = asyncio.create_task(self._deliver(http, row), name=f"webhook:{row['id']}")
        self._tasks[task] = (row["id"], row["attempts"])

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.pop(finished, None)
            self._busy[tenant_id] -= 1
            if self._busy[tenant_id] <= 0:
                del self._busy[tenant_id]
            self._wake.set()

        task.add_done_callback(done)

    async def _drain(self) -> None:
        """Stop: requests in flight are cancelled and their claims handed back (due now, for
        any instance, with the same id); if that fails (PostgreSQL is what broke), their
        leases run out instead."""
        claims = dict(self._tasks)
        for task in claims:
            task.cancel()
        await asyncio.gather(*claims, return_exceptions=True)
        if not claims:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                await store.release(self._pool, list(claims.values()))
        except (asyncpg.PostgresError, OSError, TimeoutError):
            log.warning("webhook claims left to their leases", extra={"count": len(claims)})

    async def _deliver(self, http: aiohttp.ClientSession, row: asyncpg.Record) -> None:
        s = self._settings
        started = time.monotonic()
        at = datetime.now(UTC)
        status_code: int | None = None
        error: str | None = None
        try:
            status_code = await self._attempt(http, row)
            outcome = "succeeded"
        except _Failed as failed:
            status_code, error, outcome = failed.status_code, failed.error, failed.outcome
        except Exception:  # a bug of ours: recorded and retried like any failure, and logged
            log.exception("webhook attempt failed inside notifyd", extra={"id": str(row["id"])})
            error, outcome = "notifyd failed to make the request (logged for its operator)", "error"
        latency = time.monotonic() - started
        self._metrics.webhook_attempts.labels(outcome).inc()
        self._metrics.webhook_attempt_seconds.observe(latency)
        if error is None:
            status = "succeeded"
            retry_in = 0.0
        else:
            retry_in = exponential_backoff(
                row["attempts"], s.webhook_retry_base, s.webhook_retry_cap
            )
            status = "pending" if retry_in < row["window_left"] else "failed"
        try:
            endpoint_id = await store.record(
                self._pool,
                row["id"],
                row["attempts"],
                status=status,
                retry_in=retry_in,
                status_code=status_code,
                error=error,
                latency_ms=round(latency * 1000),
                at=at,
                kept=webhooks.ATTEMPTS_KEPT,
            )
            if endpoint_id is None:
                return  # replayed or taken over meanwhile: the row is another claim's now
            if error is None:
                lag = (datetime.now(UTC) - row["occurred_at"]).total_seconds()
                self._metrics.webhook_delivered_seconds.observe(max(lag, 0.0))
            else:
                await self._failed(endpoint_id, row, last=status == "failed")
        except Exception:
            # PostgreSQL trouble (or a bug): the claim's lease runs out and the row is sent
            # again (at least once)
            log.warning("webhook outcome not recorded", exc_info=True, extra={"id": str(row["id"])})

    async def _failed(self, endpoint_id: uuid.UUID, row: asyncpg.Record, *, last: bool) -> None:
        s = self._settings
        reason = (
            f"every attempt failed for {s.webhook_retry_for:g}s (NOTIFYD_WEBHOOK_RETRY_FOR); "
            "PATCH enabled: true to turn it on again"
        )
        async with self._pool.acquire() as conn:
            endpoint = await store.endpoint_failed(
                conn,
                endpoint_id,
                disable_after=s.webhook_retry_for,
                reason=reason,
                last=last,
                window_start=row["window_start"],
            )
        if endpoint is None:
            return
        self._metrics.webhook_endpoints_disabled.inc()
        log.warning(
            "webhook endpoint disabled",
            extra={"tenant": endpoint["tenant_id"], "endpoint": str(endpoint_id)},
        )
        self._alerts.raise_alert(
            f"webhook-disabled:{endpoint['tenant_id']}",
            "notifyd: a tenant's webhook endpoint was disabled",
            f"Tenant {endpoint['tenant_id']}'s webhook endpoint {endpoint_id} failed every "
            f"attempt for {s.webhook_retry_for:g}s and was disabled; its waiting deliveries "
            "failed. The tenant's admin can PATCH it with enabled: true and replay them.",
        )

    async def _attempt(self, http: aiohttp.ClientSession, row: asyncpg.Record) -> int:
        """One POST; its status code if 2xx, else `_Failed`."""
        url = URL(row["url"])
        if url.scheme != "https" and not (
            url.scheme == "http" and self._settings.webhook_allow_http
        ):
            raise _Failed("https is required (NOTIFYD_WEBHOOK_ALLOW_HTTP is off)", "refused")
        host, port = url.raw_host or "", url.port or 443
        if _is_literal(host):
            try:
                await self._egress.check(host, port)  # aiohttp resolves no literal
            except EgressRefused as exc:
                raise _Failed(exc.message, "refused") from None
        secrets = self._secrets(row)
        payload = webhooks.body(row["event_type"], row["occurred_at"], row["data"])
        headers = webhooks.headers(secrets, str(row["id"]), payload, USER_AGENT)
        try:
            async with (
                asyncio.timeout(self._settings.webhook_timeout),
                http.post(url, data=payload, headers=headers, allow_redirects=False) as response,
            ):
                # bounded: a receiver that streams an endless answer is cut off here
                await response.content.read(self._settings.webhook_response_max_bytes)
                if 200 <= response.status < 300:
                    return response.status
                raise _Failed(f"answered {response.status}", "http_error", response.status)
        except TimeoutError:
            raise _Failed(
                f"no answer within {self._settings.webhook_timeout:g}s", "timeout"
            ) from None
        except aiohttp.ClientConnectorDNSError as exc:
            reason = exc.os_error.reason if isinstance(exc.os_error, Blocked) else None
            if isinstance(reason, EgressRefused):
                log.info("webhook refused by the egress policy", extra={"address": reason.address})
                raise _Failed(reason.message, "refused") from None
            if isinstance(reason, ResolveFailed):
                raise _Failed(str(reason), "connect_error") from None
            raise _Failed("DNS lookup failed", "connect_error") from None
        except aiohttp.ClientConnectorCertificateError:
            raise _Failed(
                "the TLS certificate is not valid for the host", "connect_error"
            ) from None
        except aiohttp.ClientSSLError:
            raise _Failed("TLS handshake failed", "connect_error") from None
        except aiohttp.ClientConnectorError:
            raise _Failed("could not connect", "connect_error") from None
        except (aiohttp.ClientError, OSError) as exc:
            log.info("webhook request failed", extra={"error": repr(exc)})
            raise _Failed("the connection failed during the request", "connect_error") from None

    def _secrets(self, row: asyncpg.Record) -> list[str]:
        """The secrets to sign with: the current one, and the one before a recent rotation."""
        if self._box is None:
            raise _Failed("secrets cannot be read: NOTIFYD_TENANT_SECRET_KEY is not set", "refused")
        sealed = [row["secret_enc"]]
        if row["previous_secret_enc"] is not None:
            sealed.append(row["previous_secret_enc"])
        try:
            return [self._box.decrypt(value) for value in sealed]
        except SecretError:
            self._alerts.raise_alert(
                "tenant-secrets",
                "notifyd: tenant secrets cannot be decrypted",
                f"Tenant {row['tenant_id']}'s webhook secret does not decrypt with "
                "NOTIFYD_TENANT_SECRET_KEY. Its deliveries are being retried.",
            )
            raise _Failed(
                "the endpoint's secret cannot be read (an operator is alerted)", "refused"
            ) from None


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


async def _first(*events: asyncio.Event) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
