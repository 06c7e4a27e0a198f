"""Composition of the delivery pipeline: providers, the actors around them, and their wiring.

Kept out of app.py so the composition root reads as a list of resources, and so tests can
build the very same pipeline the daemon runs.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import quote

import aiohttp
import asyncpg
from redis.asyncio import Redis

from notifyd.actors.alerts import Alerts
from notifyd.actors.bounce_listener import BounceListener
from notifyd.actors.dispatcher import DirectInApp, Dispatcher
from notifyd.actors.reminder_firer import ReminderFirer
from notifyd.actors.sender import Sender
from notifyd.actors.stream_stats import StreamStats
from notifyd.actors.sweeper import Sweeper
from notifyd.actors.tenant_config_refresher import TenantConfigRefresher
from notifyd.actors.timer import Timer
from notifyd.actors.webhook_sender import WebhookSender
from notifyd.actors.workflow_firer import WorkflowFirer
from notifyd.bounces import return_path
from notifyd.egress import Egress
from notifyd.ingest.accept import EventAcceptor
from notifyd.ingest.kafka_delivery_events import KafkaDeliveryEvents
from notifyd.ingest.kafka_source import KafkaEventSource
from notifyd.ingest.rabbitmq_source import RabbitMqEventSource
from notifyd.ingest.redis_source import RedisEventSource
from notifyd.keys import Keys
from notifyd.limits import Limits
from notifyd.metrics import Metrics
from notifyd.providers.base import Delivery, Provider, TransientError
from notifyd.providers.inapp import InAppProvider
from notifyd.providers.sms import TwilioSmsProvider
from notifyd.providers.smtp import ListUnsubscribe, SmtpProvider, SmtpSettings
from notifyd.ratelimit import Limiter
from notifyd.realtime.history import Bounds, History
from notifyd.secretbox import SecretBox, SecretError
from notifyd.settings import Settings
from notifyd.store.limits import TenantLimits
from notifyd.store.tenants import (
    SourceUnavailable,
    TenantSettings,
    TenantSettingsCache,
    TwilioConfig,
    region_for,
    smtp_for,
    twilio_for,
)
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.supervisor import Actor
from notifyd.suppressions import address_key
from notifyd.tenant_config import Source, TenantConfigs
from notifyd.unsubscribe import Unsubscribe, derive_key
from notifyd.unsubscribe import link as unsubscribe_link
from notifyd.unsubscribe import sign as sign_unsubscribe


def consumer_name(settings: Settings) -> str:
    """Stable within a process, distinct between processes (also two on one host)."""
    return settings.instance_name or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Pipeline:
    actors: list[Actor]
    providers: list[Provider]
    schedule: Schedule
    alerts: Alerts
    tenant_settings: TenantSettingsCache
    tenant_configs: TenantConfigs | None
    tenant_limits: TenantLimits
    limiter: Limiter
    producer: Producer
    history: History
    dispatcher: Dispatcher  # also among `actors`; the outbox hands it what it just committed
    _closed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for provider in self.providers:
            await provider.close()
        if self.tenant_configs is not None:
            await self.tenant_configs.close()


def build_pipeline(
    settings: Settings,
    pool: asyncpg.Pool,
    redis: Redis,
    keys: Keys,
    metrics: Metrics,
    egress: Egress,
    http_session: aiohttp.ClientSession | None = None,
    *,
    keyed_pool: asyncpg.Pool,
) -> Pipeline:
    """`egress`: the policy for tenants' own relays (the daemon's, which closes it);
    `http_session`: the daemon's client session (the tenant configuration source's);
    `keyed_pool`: the dispatcher's statements that find rows by key (`store.pool`)."""
    box = SecretBox.from_settings(settings)
    configs = None
    if settings.tenant_config_url:
        assert http_session is not None, "the tenant configuration source needs an HTTP session"
        configs = TenantConfigs(
            Source(settings, http_session, egress),
            redis,
            keys,
            metrics,
            settings.tenant_config_ttl,
        )
    tenants = TenantSettingsCache(pool, box, source=None if configs is None else configs.get)
    tenant_limits = TenantLimits(pool, Limits.from_settings(settings), settings.limits_refresh)
    limiter = Limiter(redis, keys)
    name = consumer_name(settings)
    schedule = Schedule(redis, keys.timer, settings.stream_max_len)
    producer = Producer(redis, settings.stream_max_len)
    history = History(
        redis,
        keys,
        Bounds(
            max_len=settings.ws_history_len,
            ttl=settings.ws_history_ttl,
            replay_entries=settings.ws_replay_max_entries,
            replay_bytes=settings.ws_replay_max_bytes,
        ),
    )
    alerts = Alerts(settings, redis, keys)

    async def tenant(tenant_id: str) -> TenantSettings:
        try:
            return await tenants.get(tenant_id)
        except SecretError as exc:
            # retried, not failed: the operator can restore the key, and is told to
            alerts.raise_alert(
                "tenant-secrets",
                "notifyd: tenant secrets cannot be decrypted",
                f"Tenant {tenant_id}'s stored SMTP/Twilio secrets do not decrypt with "
                f"NOTIFYD_TENANT_SECRET_KEY ({exc}). Deliveries are being retried.",
            )
            raise TransientError(f"tenant settings unreadable: {exc}") from None
        except SourceUnavailable as exc:
            raise TransientError(str(exc)) from None

    async def smtp_config(tenant_id: str) -> SmtpSettings:
        return smtp_for(await tenant(tenant_id), settings)

    async def twilio_config(tenant_id: str) -> TwilioConfig | None:
        return twilio_for(await tenant(tenant_id), settings)

    async def twilio_owner(tenant_id: str) -> str:
        return tenant_id if (await tenant(tenant_id)).twilio is not None else "global"

    async def region(tenant_id: str) -> str:
        return region_for(await tenant(tenant_id), settings)

    unsubscribe_key = (
        derive_key(settings.unsubscribe_secret)
        if settings.unsubscribe_secret and settings.public_url
        else None
    )

    def unsubscribe_url(delivery: Delivery) -> ListUnsubscribe | None:
        if unsubscribe_key is not None:
            # one-click (RFC 8058): notifyd's own signed link; never on critical mail, which
            # opt-outs do not stop
            if delivery.critical:
                return None
            token = sign_unsubscribe(
                unsubscribe_key,
                Unsubscribe(
                    delivery.tenant_id,
                    delivery.user_id,
                    None
                    if delivery.user_id is not None
                    else address_key("email", delivery.recipient),
                    delivery.category or "",
                ),
            )
            if token is None:
                return None
            return ListUnsubscribe(unsubscribe_link(settings.public_url, token), one_click=True)
        if not settings.preferences_url or delivery.user_id is None:
            return None
        # opaque ids may hold `|`, `+`, `:`: percent-encode every value placed in the URL
        return ListUnsubscribe(
            settings.preferences_url.format(
                tenant_id=quote(delivery.tenant_id, safe=""),
                user_id=quote(delivery.user_id, safe=""),
                category=quote(delivery.category or "", safe=""),
            )
        )

    async def delivery_status(delivery: Delivery, status: str) -> None:
        assert delivery.user_id is not None
        await history.signal_user(
            delivery.tenant_id,
            delivery.user_id,
            {
                "type": "delivery",
                "notification_id": delivery.id,
                "channel": delivery.channel,
                "status": status,
                "attempt": delivery.attempt,
            },
        )

    in_app = InAppProvider(history.publish, history.publish_to_users)
    providers: list[tuple[Provider, int]] = [
        (
            SmtpProvider(
                smtp_config,
                connections_per_config=settings.smtp_connections_per_tenant,
                timeout=settings.send_timeout,
                # NOTIFYD_SEND_TIMEOUT bounds the whole send, connecting included
                connect_timeout=min(settings.smtp_connect_timeout, settings.send_timeout),
                unsubscribe_url_for=unsubscribe_url,
                return_path_for=(
                    functools.partial(return_path, settings.bounce_domain)
                    if settings.bounce_domain
                    else None
                ),
                egress=egress,
            ),
            settings.email_concurrency,
        ),
        (
            TwilioSmsProvider(settings, twilio_config, region, owner_for=twilio_owner),
            settings.sms_concurrency,
        ),
        (in_app, settings.inapp_concurrency),
    ]
    dispatcher = Dispatcher(
        pool=pool,
        keyed_pool=keyed_pool,
        redis=redis,
        keys=keys,
        settings=settings,
        consumer_name=name,
        alerts=alerts,
        producer=producer,
        metrics=metrics,
        direct_in_app=DirectInApp(keyed_pool, in_app, metrics),
        tenant_settings=tenants.public,
    )
    actors: list[Actor] = [
        dispatcher,
        *[
            Sender(
                provider=provider,
                pool=pool,
                redis=redis,
                keys=keys,
                settings=settings,
                metrics=metrics,
                schedule=schedule,
                alerts=alerts,
                consumer_name=name,
                concurrency=concurrency,
                producer=producer,
                on_status=None if provider.channel == "in_app" else delivery_status,
            )
            for provider, concurrency in providers
        ],
        ReminderFirer(
            pool=pool,
            redis=redis,
            keys=keys,
            settings=settings,
            metrics=metrics,
            producer=producer,
            consumer_name=name,
        ),
        WorkflowFirer(
            pool=pool,
            redis=redis,
            keys=keys,
            settings=settings,
            metrics=metrics,
            producer=producer,
            consumer_name=name,
            tenant_settings=tenant,
            schedule=schedule,
        ),
        Timer(
            schedule,
            lookahead=settings.reminder_lookahead,
            # read and planned ahead, fired at their own time (the firers wait for it)
            ahead=frozenset({keys.reminders, keys.workflow_steps}),
        ),
        Sweeper(
            pool=pool,
            redis=redis,
            keys=keys,
            schedule=schedule,
            metrics=metrics,
            producer=producer,
            requeue_after=settings.requeue_after,
            reminder_overdue_after=settings.requeue_after + settings.claim_idle,
            interval=settings.sweep_interval,
        ),
        StreamStats(
            redis,
            metrics,
            groups=keys.consumer_groups(),
            streams=[keys.dead_letters],
            interval=settings.stream_stats_interval,
        ),
        WebhookSender(pool=pool, settings=settings, egress=egress, metrics=metrics, alerts=alerts),
        alerts,
    ]
    if settings.bounce_domain and settings.bounce_smtp_port:
        actors.append(BounceListener(pool=pool, settings=settings))
    if settings.events_enabled:
        acceptor = EventAcceptor(
            pool=pool,
            producer=producer,
            keys=keys,
            settings=settings,
            metrics=metrics,
            limiter=limiter,
            tenant_limits=tenant_limits,
            tenant_settings=tenants.public,
            schedule=schedule,
        )
        actors.append(
            RedisEventSource(
                redis=redis,
                keys=keys,
                settings=settings,
                acceptor=acceptor,
                producer=producer,
                alerts=alerts,
                consumer_name=name,
            )
        )
        brokers: list[type[RabbitMqEventSource | KafkaEventSource]] = []
        if settings.rabbitmq_url:
            brokers.append(RabbitMqEventSource)
        if settings.kafka_bootstrap_servers and settings.kafka_topics:
            brokers.append(KafkaEventSource)
        actors += [
            source(
                settings=settings,
                acceptor=acceptor,
                producer=producer,
                keys=keys,
                alerts=alerts,
                consumer_name=name,
            )
            for source in brokers
        ]
    if settings.kafka_events_topic:
        actors.append(KafkaDeliveryEvents(settings=settings, pool=pool))
    if configs is not None:
        actors.append(TenantConfigRefresher(configs))
    return Pipeline(
        actors=actors,
        providers=[provider for provider, _ in providers],
        schedule=schedule,
        alerts=alerts,
        tenant_settings=tenants,
        tenant_configs=configs,
        tenant_limits=tenant_limits,
        limiter=limiter,
        producer=producer,
        history=history,
        dispatcher=dispatcher,
    )
