"""The daemon's one Prometheus registry and the metrics defined on it.

A registry per `Metrics` object (not the global default) keeps tests and several in-process
instances from colliding, and keeps library-registered collectors out of our catalogue.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from notifyd import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.build_info = Gauge(
            "notifyd_build_info",
            "Always 1; labels say which build is running.",
            ["version", "python"],
            registry=self.registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.http_requests = Counter(
            "notifyd_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "notifyd_http_request_duration_seconds",
            "Time from request start to response, by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_in_flight = Gauge(
            "notifyd_http_requests_in_flight",
            "Requests being handled right now.",
            registry=self.registry,
        )
        self.actor_restarts = Counter(
            "notifyd_actor_restarts_total",
            "Times the supervisor restarted an actor after it crashed.",
            ["actor"],
            registry=self.registry,
        )
        self.notifications_accepted = Counter(
            "notifyd_notifications_accepted_total",
            "Notifications stored and queued, by channel.",
            ["channel"],
            registry=self.registry,
        )
        self.enqueue_failures = Counter(
            "notifyd_enqueue_failures_total",
            "Stored rows whose XADD failed; the sweeper re-enqueues them.",
            registry=self.registry,
        )
        self.dispatch_fallbacks = Counter(
            "notifyd_dispatch_fallbacks_total",
            "REST sends put on the intents stream instead of this process's dispatcher: "
            "busy (its bound of batches in flight reached), failed, closing.",
            ["reason"],
            registry=self.registry,
        )

        self.limit_refusals = Counter(
            "notifyd_limit_refusals_total",
            "Sends and sockets refused by a limit: caller, tenant (send rates), email_daily, "
            "sms_daily (quotas on the platform's relay and Twilio account), sockets_user, "
            "sockets_tenant (socket caps).",
            ["limit"],
            registry=self.registry,
        )

        self.deliveries = Counter(
            "notifyd_deliveries_total",
            "Delivery outcomes by channel: sent, retrying, failed.",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.provider_latency = Histogram(
            "notifyd_provider_seconds",
            "Time a provider call took (SMTP, Twilio, in-app publish), by channel.",
            ["channel"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.relay_breaker = Gauge(
            "notifyd_relay_breaker_state",
            "Circuit breaker of each relay (SMTP configuration, Twilio account) in this "
            "instance: 0 closed, 1 open (its mail is parked), 2 half open (one probe out). "
            "`relay` is the owning tenant's id, or global for the platform's.",
            ["channel", "relay"],
            registry=self.registry,
        )
        self.parked = Counter(
            "notifyd_deliveries_parked_total",
            "Deliveries parked on the timer wheel without a provider call or an attempt, by "
            "reason: breaker (their relay's circuit is open), tenant_cap (their tenant had "
            "its sends in flight and its queue full).",
            ["channel", "reason"],
            registry=self.registry,
        )
        self.tenant_in_flight = Gauge(
            "notifyd_tenant_sends_in_flight",
            "Sends in flight in this instance, by channel and tenant "
            "(at most NOTIFYD_TENANT_SEND_CONCURRENCY).",
            ["channel", "tenant"],
            registry=self.registry,
        )
        self.requeued = Counter(
            "notifyd_requeued_total",
            "Stranded rows the sweeper put back on a stream from PostgreSQL.",
            registry=self.registry,
        )
        self.retention_purged = Counter(
            "notifyd_retention_purged_rows_total",
            "Rows the housekeeper deleted past their retention, by table.",
            ["table"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "notifyd_dead_letters_total",
            "Entries copied to the dead-letter stream, by source stream and cause: failed "
            "(the delivery failed for good), poison (cannot be handled), redelivered (the "
            "handler kept crashing).",
            ["stream", "cause"],
            registry=self.registry,
        )
        self.stream_length = Gauge(
            "notifyd_stream_length",
            "Entries in a Redis stream (XLEN), refreshed every NOTIFYD_STREAM_STATS_INTERVAL.",
            ["stream"],
            registry=self.registry,
        )
        self.stream_pending = Gauge(
            "notifyd_stream_pending",
            "Entries a consumer group has read but not acknowledged (XINFO GROUPS pending).",
            ["stream", "group"],
            registry=self.registry,
        )
        self.stream_lag = Gauge(
            "notifyd_stream_lag",
            "Entries a consumer group has not read yet (XINFO GROUPS lag); absent when Redis "
            "cannot tell.",
            ["stream", "group"],
            registry=self.registry,
        )

        self.reminders = Counter(
            "notifyd_reminders_total",
            "Reminders by what happened to them: scheduled, fired, skipped, cancelled.",
            ["outcome"],
            registry=self.registry,
        )
        self.reminder_lateness = Histogram(
            "notifyd_reminder_lateness_ms",
            "How long after its reminder_time a reminder fired, in milliseconds.",
            buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 60000, 600000),
            registry=self.registry,
        )

        self.workflow_steps = Counter(
            "notifyd_workflow_steps_total",
            "Workflow steps by what happened at their time: sent, skipped, failed.",
            ["outcome"],
            registry=self.registry,
        )
        self.workflow_step_lateness = Histogram(
            "notifyd_workflow_step_lateness_ms",
            "How long after its due time a workflow step was sent or skipped, in milliseconds.",
            buckets=(5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 60000, 600000),
            registry=self.registry,
        )

        self.ws_connections = Gauge(
            "notifyd_ws_connections",
            "WebSocket connections open on this instance, by endpoint (notifications, chat).",
            ["endpoint"],
            registry=self.registry,
        )
        self.ws_messages_in = Counter(
            "notifyd_ws_messages_in_total",
            "Frames received from WebSocket clients, by endpoint and frame type.",
            ["endpoint", "type"],
            registry=self.registry,
        )
        self.ws_rate_limited = Counter(
            "notifyd_ws_rate_limited_total",
            "Client frames refused because the connection sent faster than its allowed rate.",
            registry=self.registry,
        )
        self.ws_fanout_latency = Histogram(
            "notifyd_ws_fanout_seconds",
            "Time from publishing a live event to this instance queueing it to its sockets.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ws_messages_out = Counter(
            "notifyd_ws_messages_out_total",
            "Live events queued to WebSocket clients.",
            registry=self.registry,
        )
        self.tenant_config_fetches = Counter(
            "notifyd_tenant_config_fetches_total",
            "Reads of tenants' configuration documents, by outcome: fetched, not_modified (304), "
            "shared (another instance validated this version), unreachable, refused.",
            ["outcome"],
            registry=self.registry,
        )
        self.tenant_config_stale = Counter(
            "notifyd_tenant_config_stale_total",
            "Times a tenant's configuration was used past its TTL because the source failed.",
            registry=self.registry,
        )
        self.ws_dropped = Counter(
            "notifyd_ws_dropped_slow_clients_total",
            "WebSocket clients disconnected because they did not read in time.",
            registry=self.registry,
        )
        self.webhook_attempts = Counter(
            "notifyd_webhook_attempts_total",
            "Webhook requests made, by outcome: succeeded (a 2xx in time), http_error (another "
            "status), timeout, connect_error, refused (egress policy, https required, secret "
            "unreadable), error (a failure inside notifyd, logged).",
            ["outcome"],
            registry=self.registry,
        )
        self.webhook_attempt_seconds = Histogram(
            "notifyd_webhook_attempt_duration_seconds",
            "Time one webhook request took, whatever its outcome.",
            buckets=(*LATENCY_BUCKETS, 15.0, 30.0),
            registry=self.registry,
        )
        self.webhook_delivered_seconds = Histogram(
            "notifyd_webhook_delivery_lag_seconds",
            "Time from the change a webhook reports to its receiver's 2xx (retries included).",
            buckets=(*LATENCY_BUCKETS, 30.0, 300.0, 3600.0, 86400.0),
            registry=self.registry,
        )
        self.webhook_endpoints_disabled = Counter(
            "notifyd_webhook_endpoints_disabled_total",
            "Webhook endpoints disabled after failing every attempt for NOTIFYD_WEBHOOK_RETRY_FOR.",
            registry=self.registry,
        )

    def request_answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count and time one HTTP request. `labels()` validates and takes a lock on every
        call, which showed in profiles of the send path; the children are kept per (route,
        method, status) instead, as bounded a set as the series themselves."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(route, method, str(status)),
                self.http_latency.labels(route, method),
            )
            self._request_children[key] = children
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
