"""One typed settings object from defaults, an optional TOML file, `.env` and the environment.

Precedence, lowest first: built-in default, TOML file (`NOTIFYD_CONFIG` or `--config`), `.env`
in the working folder, process environment. The environment names of the services notifyd
replaces (`DATABASE_URL`, `REDIS_HOST`, `EMAIL_HOST`, `JWT_SECRET`, `TWILIO_*`...) work as
written, so an existing deployment's env file can be pointed at notifyd unchanged.

Every problem is collected before failing, so `notifyd check-config` can name all of them at once.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values

ROLES = ("user", "service", "admin")
CHANNELS = ("email", "sms", "in_app")
DEFAULT_ID_PATTERN = r"[A-Za-z0-9._~:@|+=-]+"
# a reminder read this far early waits in the firer, holding its stream entry unacknowledged
MAX_REMINDER_LOOKAHEAD = 5.0
DEFAULT_SEND_POLICY = "user=in_app;service=email,sms,in_app;admin=email,sms,in_app"
# the ports a tenant's relay may listen on at a public address: SMTP, submission, implicit
# TLS, and the alternatives the large relay services offer (2525; Amazon SES: 2465, 2587)
EGRESS_DEFAULT_PORTS = (25, 465, 587, 2465, 2525, 2587)


class SettingsError(Exception):
    """Raised with every problem found, each naming the setting at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """The daemon's configuration; secrets are kept out of `repr`."""

    # server
    host: str = "127.0.0.1"
    port: int = 8000
    debug: bool = False
    log_level: str = "info"
    log_format: str = "auto"
    shutdown_timeout: float = 15.0
    instance_name: str = ""
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # database
    database_url: str = field(default="postgresql://postgres@127.0.0.1:5432/notifyd", repr=False)
    db_pool_min: int = 2
    db_pool_max: int = 20
    db_command_timeout: float = 10.0
    # a connection from the pool within this, or TimeoutError (the caller's 503): a hung
    # PostgreSQL holds every connection, and the queue for them would otherwise grow forever
    db_acquire_timeout: float = 5.0
    # a request waits this long for its group commit, then answers 503 (accept.Outbox)
    commit_timeout: float = 10.0
    # redis
    redis_url: str = field(default="", repr=False)
    redis_host: str = "localhost"
    redis_port: int = 6379
    redis_db: int = 0
    redis_password: str = field(default="", repr=False)
    redis_prefix: str = "notifyd"
    redis_max_connections: int = 64
    # one Redis command (and connecting, and waiting for a pooled connection): a hung Redis
    # raises TimeoutError instead of holding its caller forever; longer than any BLOCK
    redis_timeout: float = 5.0
    # /readyz and the watchdog's checks of PostgreSQL and Redis, each
    ready_timeout: float = 2.0
    # email (the global SMTP fallback; tenants may override it)
    email_host: str = "localhost"
    email_port: int = 25
    email_host_user: str = ""
    email_host_password: str = field(default="", repr=False)
    email_use_tls: bool = False
    email_use_ssl: bool = False
    email_from: str = "notifyd@localhost"
    recipient_list: tuple[str, ...] = ()
    # auth
    jwt_secret: str = field(default="", repr=False)
    jwt_expiry: int = 3600
    jwt_algorithms: tuple[str, ...] = ()
    jwt_public_key_file: str = ""
    jwt_jwks_url: str = ""
    jwt_jwks_cache_seconds: float = 300.0
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_leeway: float = 30.0
    jwt_tenant_claim: str = "tenant_id"
    jwt_user_claim: str = "user_id"
    jwt_role_claim: str = "role"
    send_policy: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: parse_send_policy(DEFAULT_SEND_POLICY)
    )
    # twilio
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    twilio_phone: str = ""
    twilio_base_url: str = ""
    # delivery
    public_url: str = ""
    preferences_url: str = ""
    default_region: str = "US"
    default_locale: str = "en"
    tenant_secret_key: str = field(default="", repr=False)
    send_max_attempts: int = 5
    retry_base: float = 2.0
    retry_cap: float = 300.0
    send_timeout: float = 10.0
    claim_idle: float = 60.0
    stream_block: float = 1.0
    stream_max_len: int = 1_000_000
    reminder_late_after: float = 60.0
    # reminders reach the firer this far ahead of their time, to be read and planned by then
    reminder_lookahead: float = 0.3
    requeue_after: float = 30.0
    email_concurrency: int = 32
    sms_concurrency: int = 8
    inapp_concurrency: int = 32
    dispatch_concurrency: int = 16
    smtp_connections_per_tenant: int = 2
    # egress policy for tenants' own relays (notifyd/egress.py, docs/limits.md)
    egress_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    egress_allowed_ports: tuple[int, ...] = EGRESS_DEFAULT_PORTS
    egress_resolve_timeout: float = 3.0
    egress_resolve_threads: int = 4
    # fair delivery across tenants (notifyd/fairness.py)
    smtp_connect_timeout: float = 5.0
    tenant_send_concurrency: int = 4
    tenant_send_queue: int = 128
    tenant_park_delay: float = 0.5
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    alert_interval: float = 300.0
    # limits
    max_body_bytes: int = 1_048_576
    message_max_length: int = 10_000
    subject_max_length: int = 500
    notification_max_length: int = 100_000
    context_max_keys: int = 200
    # one rendered template field: characters output (and, apart, built on the way), steps
    template_max_output: int = 1_000_000
    template_max_steps: int = 100_000
    id_max_length: int = 128
    id_pattern: str = DEFAULT_ID_PATTERN
    page_size_default: int = 50
    page_size_max: int = 200
    mark_read_max_ids: int = 1000
    idempotency_ttl: float = 86_400.0
    idempotency_stale_after: float = 60.0
    # real time
    ws_allowed_origins: tuple[str, ...] = ()
    ws_heartbeat: float = 20.0
    ws_max_frame: int = 65_536
    ws_send_queue: int = 256
    ws_history_len: int = 1000
    # a feed's history stream is dropped this long after its last event (the client that
    # comes back later gets a `gap` and refetches over REST): one day covers a blip, a
    # deploy or a night's sleep, and bounds how long made-up ids occupy Redis
    ws_history_ttl: float = 86_400.0
    # one `?since=` replay: at most this many events and bytes (the newest; a `gap` says to
    # refetch the rest), so a reconnect never loads a whole stream into the daemon
    ws_replay_max_entries: int = 200
    ws_replay_max_bytes: int = 262_144
    ws_send_buffer: int = 1_048_576
    ws_message_rate: float = 10.0
    ws_message_burst: int = 20
    ws_presence_ttl: float = 30.0
    # a socket is told its token is expiring this long before it is closed for it (0: never)
    ws_token_warning: float = 30.0
    # chat messages stored (with their audit rows) and published in one statement and one
    # script call at most: under a burst, batches fill up, and fewer larger ones cost less
    # per message in notifyd, PostgreSQL and Redis alike (docs/benchmarks.md)
    chat_write_batch: int = 256
    room_max_members: int = 1000
    # background work
    sweep_interval: float = 10.0
    stream_stats_interval: float = 15.0
    actor_backoff_cap: float = 30.0
    actor_max_restarts: int = 20
    actor_restart_window: float = 60.0
    # event ingestion (Redis stream, RabbitMQ)
    events_enabled: bool = True
    event_concurrency: int = 8
    event_max_recipients: int = 100
    event_max_deliveries: int = 20
    event_dedupe_ttl: float = 2_592_000.0
    rabbitmq_url: str = field(default="", repr=False)
    rabbitmq_queue: str = "notifyd.events"
    rabbitmq_prefetch: int = 16
    # which tenants each source may publish for ("*": all) and whether it may send
    # `critical`; open by default, as before (notifyd.ingest.binding says why)
    events_tenants: tuple[str, ...] = ("*",)
    events_allow_critical: bool = True
    rabbitmq_tenants: tuple[str, ...] = ("*",)
    rabbitmq_allow_critical: bool = True
    # RabbitMQ user → tenants it may publish for (the AMQP `user_id` the broker checks);
    # empty: any user, within NOTIFYD_RABBITMQ_TENANTS
    rabbitmq_user_tenants: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # retention in PostgreSQL (seconds; 0 keeps forever): rows in a final state older than
    # this are deleted by the housekeeper, `retain_batch` rows a statement, `retain_pause`
    # seconds between statements. Ingested event ids follow NOTIFYD_EVENT_DEDUPE_TTL.
    retain_notifications: float = 7_776_000.0  # 90 days
    retain_messages: float = 31_536_000.0  # 365 days
    retain_reminders: float = 7_776_000.0  # 90 days after the interview
    retain_audit: float = 31_536_000.0  # 365 days: check your compliance needs
    retain_batch: int = 1000
    retain_pause: float = 0.1
    # rate limits, daily quotas and socket caps (docs/limits.md); 0 means unlimited, and a
    # platform operator may override each per tenant (`notifyd limits set`)
    rate_user: float = 5.0  # sends a second, per `user` token (tenant + user + role)
    rate_user_burst: int = 20
    rate_service: float = 0.0  # per `service` or `admin` token: off, trusted services
    rate_service_burst: int = 1000
    rate_tenant: float = 20_000.0  # every caller of a tenant together
    rate_tenant_burst: int = 40_000
    quota_email_daily: int = 50_000  # per tenant and UTC day, on the global EMAIL_* relay
    quota_sms_daily: int = 5_000  # per tenant and UTC day, on the platform's Twilio account
    ws_max_per_user: int = 20  # open sockets of one user, every instance together
    ws_max_per_tenant: int = 20_000
    limits_refresh: float = 10.0  # seconds an operator's per-tenant override takes to apply

    @property
    def effective_redis_url(self) -> str:
        """`REDIS_URL` when set, else one built from the seed's `REDIS_HOST`/`REDIS_PORT`."""
        if self.redis_url:
            return self.redis_url
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"

    @property
    def effective_jwt_algorithms(self) -> tuple[str, ...]:
        """Algorithms accepted on incoming tokens: configured, or implied by the keys present."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        algorithms: list[str] = []
        if self.jwt_secret:
            algorithms.append("HS256")
        if self.jwt_public_key_file or self.jwt_jwks_url:
            algorithms += ["RS256", "ES256"]
        return tuple(algorithms)


@dataclass(frozen=True)
class _Spec:
    """How one setting is read: its environment names, TOML key, parser and documentation."""

    name: str
    env: tuple[str, ...]
    toml: str
    parse: Callable[[Any], Any]
    secret: bool = False


def _to_str(value: Any) -> str:
    if not isinstance(value, str | int | float):
        raise ValueError("must be a string")
    return str(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {value!r}") from None


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _to_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(item).strip() for item in value if str(item).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def _to_networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`127.0.0.1, 10.0.0.0/8, ::1` → networks (an address alone is a network of one)."""
    networks = []
    for part in _to_list(value):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {part!r}") from None
    return tuple(networks)


def _to_ports(value: Any) -> tuple[int, ...]:
    """`25, 587` → ports; `any` (or nothing) → () meaning every port."""
    parts = _to_list(value)
    if [p.lower() for p in parts] == ["any"]:
        return ()
    ports = []
    for part in parts:
        port = _to_int(part)
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {part!r}")
        ports.append(port)
    return tuple(ports)


def _to_table(value: Any, shape: str) -> dict[str, Any]:
    """`a=x,y;b=z` (or a TOML table) → key → its list (as text, or the TOML list); `shape`
    names the form an entry must have (`user=tenant,tenant`) in the error."""
    if isinstance(value, Mapping):
        return dict(value)
    table: dict[str, Any] = {}
    for part in str(value).split(";"):
        if not part.strip():
            continue
        key, sep, rest = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected {shape} in {part.strip()!r}")
        table[key.strip()] = rest
    return table


def parse_user_tenants(value: Any) -> Mapping[str, frozenset[str]]:
    """`svc-a=TEN-1,TEN-2;svc-b=*` (or a TOML table of lists) → RabbitMQ user → tenants."""
    table = _to_table(value, "user=tenant,tenant")
    mapping: dict[str, frozenset[str]] = {}
    for user, tenants in table.items():
        names = frozenset(_to_list(tenants))
        if not names:
            raise ValueError(f"user {user!r}: list its tenants, or * for all")
        if "*" in names and len(names) > 1:
            raise ValueError(f"user {user!r}: * (every tenant) or a list of tenants, not both")
        mapping[str(user)] = names
    return mapping


def parse_send_policy(value: Any) -> Mapping[str, frozenset[str]]:
    """`user=in_app;service=email,sms,in_app` (or a TOML table of lists) → role → channels."""
    table = _to_table(value, "role=channel,channel")
    policy: dict[str, frozenset[str]] = {role: frozenset() for role in ROLES}
    for role, channels in table.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        names = frozenset(_to_list(channels))
        unknown = names - set(CHANNELS)
        if unknown:
            raise ValueError(
                f"unknown channel {sorted(unknown)[0]!r} (channels: {', '.join(CHANNELS)})"
            )
        policy[role] = names
    return policy


def _spec(
    name: str,
    env: str | tuple[str, ...],
    toml: str,
    parse: Callable[[Any], Any],
    secret: bool = False,
) -> _Spec:
    return _Spec(name, (env,) if isinstance(env, str) else env, toml, parse, secret)


SPECS: tuple[_Spec, ...] = (
    _spec("host", "NOTIFYD_HOST", "server.host", _to_str),
    _spec("port", "NOTIFYD_PORT", "server.port", _to_int),
    _spec("debug", "DEBUG", "server.debug", _to_bool),
    _spec("log_level", "NOTIFYD_LOG_LEVEL", "server.log_level", _to_str),
    _spec("log_format", "NOTIFYD_LOG_FORMAT", "server.log_format", _to_str),
    _spec("shutdown_timeout", "NOTIFYD_SHUTDOWN_TIMEOUT", "server.shutdown_timeout", _to_float),
    _spec("instance_name", "NOTIFYD_INSTANCE_NAME", "server.instance_name", _to_str),
    _spec("trusted_proxies", "NOTIFYD_TRUSTED_PROXIES", "server.trusted_proxies", _to_networks),
    _spec("database_url", "DATABASE_URL", "database.url", _to_str, secret=True),
    _spec("db_pool_min", "NOTIFYD_DB_POOL_MIN", "database.pool_min", _to_int),
    _spec("db_pool_max", "NOTIFYD_DB_POOL_MAX", "database.pool_max", _to_int),
    _spec(
        "db_command_timeout", "NOTIFYD_DB_COMMAND_TIMEOUT", "database.command_timeout", _to_float
    ),
    _spec(
        "db_acquire_timeout",
        "NOTIFYD_DB_ACQUIRE_TIMEOUT",
        "database.acquire_timeout",
        _to_float,
    ),
    _spec("commit_timeout", "NOTIFYD_COMMIT_TIMEOUT", "database.commit_timeout", _to_float),
    _spec("redis_url", "REDIS_URL", "redis.url", _to_str, secret=True),
    _spec("redis_timeout", "NOTIFYD_REDIS_TIMEOUT", "redis.timeout", _to_float),
    _spec("ready_timeout", "NOTIFYD_READY_TIMEOUT", "server.ready_timeout", _to_float),
    _spec("redis_host", "REDIS_HOST", "redis.host", _to_str),
    _spec("redis_port", "REDIS_PORT", "redis.port", _to_int),
    _spec("redis_db", "REDIS_DB", "redis.db", _to_int),
    _spec("redis_password", "REDIS_PASSWORD", "redis.password", _to_str, secret=True),
    _spec("redis_prefix", "NOTIFYD_REDIS_PREFIX", "redis.prefix", _to_str),
    _spec(
        "redis_max_connections", "NOTIFYD_REDIS_MAX_CONNECTIONS", "redis.max_connections", _to_int
    ),
    _spec("email_host", "EMAIL_HOST", "email.host", _to_str),
    _spec("email_port", "EMAIL_PORT", "email.port", _to_int),
    _spec("email_host_user", "EMAIL_HOST_USER", "email.user", _to_str),
    _spec("email_host_password", "EMAIL_HOST_PASSWORD", "email.password", _to_str, secret=True),
    _spec("email_use_tls", "EMAIL_USE_TLS", "email.use_tls", _to_bool),
    _spec("email_use_ssl", "EMAIL_USE_SSL", "email.use_ssl", _to_bool),
    _spec("email_from", ("EMAIL_FROM", "DEFAULT_FROM_EMAIL"), "email.from", _to_str),
    _spec("recipient_list", "RECIPIENT_LIST", "email.recipient_list", _to_list),
    _spec("jwt_secret", "JWT_SECRET", "auth.jwt_secret", _to_str, secret=True),
    _spec("jwt_expiry", "JWT_EXPIRY", "auth.jwt_expiry", _to_int),
    _spec("jwt_algorithms", "JWT_ALGORITHMS", "auth.algorithms", _to_list),
    _spec("jwt_public_key_file", "JWT_PUBLIC_KEY_FILE", "auth.public_key_file", _to_str),
    _spec("jwt_jwks_url", "JWT_JWKS_URL", "auth.jwks_url", _to_str),
    _spec("jwt_jwks_cache_seconds", "JWT_JWKS_CACHE_SECONDS", "auth.jwks_cache_seconds", _to_float),
    _spec("jwt_issuer", "JWT_ISSUER", "auth.issuer", _to_str),
    _spec("jwt_audience", "JWT_AUDIENCE", "auth.audience", _to_str),
    _spec("jwt_leeway", "JWT_LEEWAY", "auth.leeway", _to_float),
    _spec("jwt_tenant_claim", "JWT_TENANT_CLAIM", "auth.tenant_claim", _to_str),
    _spec("jwt_user_claim", "JWT_USER_CLAIM", "auth.user_claim", _to_str),
    _spec("jwt_role_claim", "JWT_ROLE_CLAIM", "auth.role_claim", _to_str),
    _spec("send_policy", "NOTIFYD_SEND_POLICY", "auth.send_policy", parse_send_policy),
    _spec("twilio_account_sid", "TWILIO_ACCOUNT_SID", "twilio.account_sid", _to_str),
    _spec("twilio_auth_token", "TWILIO_AUTH_TOKEN", "twilio.auth_token", _to_str, secret=True),
    _spec("twilio_phone", "TWILIO_PHONE", "twilio.phone", _to_str),
    _spec("twilio_base_url", "TWILIO_API_BASE_URL", "twilio.api_base_url", _to_str),
    _spec("public_url", "NOTIFYD_PUBLIC_URL", "delivery.public_url", _to_str),
    _spec("preferences_url", "NOTIFYD_PREFERENCES_URL", "delivery.preferences_url", _to_str),
    _spec("default_region", "NOTIFYD_DEFAULT_REGION", "delivery.default_region", _to_str),
    _spec("default_locale", "NOTIFYD_DEFAULT_LOCALE", "delivery.default_locale", _to_str),
    _spec(
        "tenant_secret_key",
        "NOTIFYD_TENANT_SECRET_KEY",
        "delivery.tenant_secret_key",
        _to_str,
        secret=True,
    ),
    _spec("send_max_attempts", "NOTIFYD_SEND_MAX_ATTEMPTS", "delivery.max_attempts", _to_int),
    _spec("retry_base", "NOTIFYD_RETRY_BASE", "delivery.retry_base", _to_float),
    _spec("retry_cap", "NOTIFYD_RETRY_CAP", "delivery.retry_cap", _to_float),
    _spec("send_timeout", "NOTIFYD_SEND_TIMEOUT", "delivery.send_timeout", _to_float),
    _spec("claim_idle", "NOTIFYD_CLAIM_IDLE", "delivery.claim_idle", _to_float),
    _spec("stream_block", "NOTIFYD_STREAM_BLOCK", "delivery.stream_block", _to_float),
    _spec(
        "reminder_late_after",
        "NOTIFYD_REMINDER_LATE_AFTER",
        "delivery.reminder_late_after",
        _to_float,
    ),
    _spec(
        "reminder_lookahead",
        "NOTIFYD_REMINDER_LOOKAHEAD",
        "delivery.reminder_lookahead",
        _to_float,
    ),
    _spec("stream_max_len", "NOTIFYD_STREAM_MAX_LEN", "delivery.stream_max_len", _to_int),
    _spec("requeue_after", "NOTIFYD_REQUEUE_AFTER", "delivery.requeue_after", _to_float),
    _spec("email_concurrency", "NOTIFYD_EMAIL_CONCURRENCY", "delivery.email_concurrency", _to_int),
    _spec("sms_concurrency", "NOTIFYD_SMS_CONCURRENCY", "delivery.sms_concurrency", _to_int),
    _spec("inapp_concurrency", "NOTIFYD_INAPP_CONCURRENCY", "delivery.inapp_concurrency", _to_int),
    _spec(
        "dispatch_concurrency",
        "NOTIFYD_DISPATCH_CONCURRENCY",
        "delivery.dispatch_concurrency",
        _to_int,
    ),
    _spec(
        "smtp_connections_per_tenant",
        "NOTIFYD_SMTP_CONNECTIONS_PER_TENANT",
        "delivery.smtp_connections_per_tenant",
        _to_int,
    ),
    _spec(
        "egress_allowed_networks",
        "NOTIFYD_EGRESS_ALLOWED_NETWORKS",
        "egress.allowed_networks",
        _to_networks,
    ),
    _spec(
        "egress_allowed_ports", "NOTIFYD_EGRESS_ALLOWED_PORTS", "egress.allowed_ports", _to_ports
    ),
    _spec(
        "egress_resolve_timeout",
        "NOTIFYD_EGRESS_RESOLVE_TIMEOUT",
        "egress.resolve_timeout",
        _to_float,
    ),
    _spec(
        "egress_resolve_threads",
        "NOTIFYD_EGRESS_RESOLVE_THREADS",
        "egress.resolve_threads",
        _to_int,
    ),
    _spec(
        "smtp_connect_timeout",
        "NOTIFYD_SMTP_CONNECT_TIMEOUT",
        "delivery.smtp_connect_timeout",
        _to_float,
    ),
    _spec(
        "tenant_send_concurrency",
        "NOTIFYD_TENANT_SEND_CONCURRENCY",
        "delivery.tenant_send_concurrency",
        _to_int,
    ),
    _spec("tenant_send_queue", "NOTIFYD_TENANT_SEND_QUEUE", "delivery.tenant_send_queue", _to_int),
    _spec(
        "tenant_park_delay", "NOTIFYD_TENANT_PARK_DELAY", "delivery.tenant_park_delay", _to_float
    ),
    _spec("breaker_failures", "NOTIFYD_BREAKER_FAILURES", "delivery.breaker_failures", _to_int),
    _spec("breaker_cooldown", "NOTIFYD_BREAKER_COOLDOWN", "delivery.breaker_cooldown", _to_float),
    _spec("alert_interval", "NOTIFYD_ALERT_INTERVAL", "delivery.alert_interval", _to_float),
    _spec("max_body_bytes", "NOTIFYD_MAX_BODY_BYTES", "limits.max_body_bytes", _to_int),
    _spec("message_max_length", "NOTIFYD_MESSAGE_MAX_LENGTH", "limits.message_max_length", _to_int),
    _spec("subject_max_length", "NOTIFYD_SUBJECT_MAX_LENGTH", "limits.subject_max_length", _to_int),
    _spec(
        "notification_max_length",
        "NOTIFYD_NOTIFICATION_MAX_LENGTH",
        "limits.notification_max_length",
        _to_int,
    ),
    _spec("context_max_keys", "NOTIFYD_CONTEXT_MAX_KEYS", "limits.context_max_keys", _to_int),
    _spec(
        "template_max_output",
        "NOTIFYD_TEMPLATE_MAX_OUTPUT",
        "limits.template_max_output",
        _to_int,
    ),
    _spec("template_max_steps", "NOTIFYD_TEMPLATE_MAX_STEPS", "limits.template_max_steps", _to_int),
    _spec("id_max_length", "NOTIFYD_ID_MAX_LENGTH", "limits.id_max_length", _to_int),
    _spec("id_pattern", "NOTIFYD_ID_PATTERN", "limits.id_pattern", _to_str),
    _spec("page_size_default", "NOTIFYD_PAGE_SIZE_DEFAULT", "limits.page_size_default", _to_int),
    _spec("page_size_max", "NOTIFYD_PAGE_SIZE_MAX", "limits.page_size_max", _to_int),
    _spec("mark_read_max_ids", "NOTIFYD_MARK_READ_MAX_IDS", "limits.mark_read_max_ids", _to_int),
    _spec("idempotency_ttl", "NOTIFYD_IDEMPOTENCY_TTL", "limits.idempotency_ttl", _to_float),
    _spec(
        "idempotency_stale_after",
        "NOTIFYD_IDEMPOTENCY_STALE_AFTER",
        "limits.idempotency_stale_after",
        _to_float,
    ),
    _spec("sweep_interval", "NOTIFYD_SWEEP_INTERVAL", "delivery.sweep_interval", _to_float),
    _spec(
        "stream_stats_interval",
        "NOTIFYD_STREAM_STATS_INTERVAL",
        "delivery.stream_stats_interval",
        _to_float,
    ),
    _spec("ws_allowed_origins", "NOTIFYD_WS_ALLOWED_ORIGINS", "realtime.allowed_origins", _to_list),
    _spec("ws_heartbeat", "NOTIFYD_WS_HEARTBEAT", "realtime.heartbeat", _to_float),
    _spec("ws_max_frame", "NOTIFYD_WS_MAX_FRAME", "realtime.max_frame", _to_int),
    _spec("ws_send_queue", "NOTIFYD_WS_SEND_QUEUE", "realtime.send_queue", _to_int),
    _spec("ws_send_buffer", "NOTIFYD_WS_SEND_BUFFER", "realtime.send_buffer", _to_int),
    _spec("ws_message_rate", "NOTIFYD_WS_MESSAGE_RATE", "realtime.message_rate", _to_float),
    _spec("ws_message_burst", "NOTIFYD_WS_MESSAGE_BURST", "realtime.message_burst", _to_int),
    _spec("ws_presence_ttl", "NOTIFYD_WS_PRESENCE_TTL", "realtime.presence_ttl", _to_float),
    _spec("ws_token_warning", "NOTIFYD_WS_TOKEN_WARNING", "realtime.token_warning", _to_float),
    _spec("chat_write_batch", "NOTIFYD_CHAT_WRITE_BATCH", "realtime.chat_write_batch", _to_int),
    _spec("room_max_members", "NOTIFYD_ROOM_MAX_MEMBERS", "realtime.room_max_members", _to_int),
    _spec("ws_history_len", "NOTIFYD_WS_HISTORY_LEN", "realtime.history_len", _to_int),
    _spec("ws_history_ttl", "NOTIFYD_WS_HISTORY_TTL", "realtime.history_ttl", _to_float),
    _spec(
        "ws_replay_max_entries",
        "NOTIFYD_WS_REPLAY_MAX_ENTRIES",
        "realtime.replay_max_entries",
        _to_int,
    ),
    _spec(
        "ws_replay_max_bytes", "NOTIFYD_WS_REPLAY_MAX_BYTES", "realtime.replay_max_bytes", _to_int
    ),
    _spec("actor_backoff_cap", "NOTIFYD_ACTOR_BACKOFF_CAP", "actors.backoff_cap", _to_float),
    _spec("actor_max_restarts", "NOTIFYD_ACTOR_MAX_RESTARTS", "actors.max_restarts", _to_int),
    _spec(
        "actor_restart_window", "NOTIFYD_ACTOR_RESTART_WINDOW", "actors.restart_window", _to_float
    ),
    _spec("events_enabled", "NOTIFYD_EVENTS_ENABLED", "events.enabled", _to_bool),
    _spec("event_concurrency", "NOTIFYD_EVENT_CONCURRENCY", "events.concurrency", _to_int),
    _spec("event_max_recipients", "NOTIFYD_EVENT_MAX_RECIPIENTS", "events.max_recipients", _to_int),
    _spec("event_max_deliveries", "NOTIFYD_EVENT_MAX_DELIVERIES", "events.max_deliveries", _to_int),
    _spec("event_dedupe_ttl", "NOTIFYD_EVENT_DEDUPE_TTL", "events.dedupe_ttl", _to_float),
    _spec("rabbitmq_url", "NOTIFYD_RABBITMQ_URL", "events.rabbitmq_url", _to_str, secret=True),
    _spec("rabbitmq_queue", "NOTIFYD_RABBITMQ_QUEUE", "events.rabbitmq_queue", _to_str),
    _spec("rabbitmq_prefetch", "NOTIFYD_RABBITMQ_PREFETCH", "events.rabbitmq_prefetch", _to_int),
    _spec("events_tenants", "NOTIFYD_EVENTS_TENANTS", "events.tenants", _to_list),
    _spec(
        "events_allow_critical",
        "NOTIFYD_EVENTS_ALLOW_CRITICAL",
        "events.allow_critical",
        _to_bool,
    ),
    _spec("rabbitmq_tenants", "NOTIFYD_RABBITMQ_TENANTS", "events.rabbitmq_tenants", _to_list),
    _spec(
        "rabbitmq_allow_critical",
        "NOTIFYD_RABBITMQ_ALLOW_CRITICAL",
        "events.rabbitmq_allow_critical",
        _to_bool,
    ),
    _spec(
        "rabbitmq_user_tenants",
        "NOTIFYD_RABBITMQ_USER_TENANTS",
        "events.rabbitmq_user_tenants",
        parse_user_tenants,
    ),
    _spec(
        "retain_notifications",
        "NOTIFYD_RETAIN_NOTIFICATIONS",
        "retention.notifications",
        _to_float,
    ),
    _spec("retain_messages", "NOTIFYD_RETAIN_MESSAGES", "retention.messages", _to_float),
    _spec("retain_reminders", "NOTIFYD_RETAIN_REMINDERS", "retention.reminders", _to_float),
    _spec("retain_audit", "NOTIFYD_RETAIN_AUDIT", "retention.audit", _to_float),
    _spec("retain_batch", "NOTIFYD_RETAIN_BATCH", "retention.batch", _to_int),
    _spec("retain_pause", "NOTIFYD_RETAIN_PAUSE", "retention.pause", _to_float),
    _spec("rate_user", "NOTIFYD_RATE_USER", "quotas.rate_user", _to_float),
    _spec("rate_user_burst", "NOTIFYD_RATE_USER_BURST", "quotas.rate_user_burst", _to_int),
    _spec("rate_service", "NOTIFYD_RATE_SERVICE", "quotas.rate_service", _to_float),
    _spec("rate_service_burst", "NOTIFYD_RATE_SERVICE_BURST", "quotas.rate_service_burst", _to_int),
    _spec("rate_tenant", "NOTIFYD_RATE_TENANT", "quotas.rate_tenant", _to_float),
    _spec("rate_tenant_burst", "NOTIFYD_RATE_TENANT_BURST", "quotas.rate_tenant_burst", _to_int),
    _spec("quota_email_daily", "NOTIFYD_QUOTA_EMAIL_DAILY", "quotas.email_daily", _to_int),
    _spec("quota_sms_daily", "NOTIFYD_QUOTA_SMS_DAILY", "quotas.sms_daily", _to_int),
    _spec("ws_max_per_user", "NOTIFYD_WS_MAX_PER_USER", "quotas.sockets_per_user", _to_int),
    _spec("ws_max_per_tenant", "NOTIFYD_WS_MAX_PER_TENANT", "quotas.sockets_per_tenant", _to_int),
    _spec("limits_refresh", "NOTIFYD_LIMITS_REFRESH", "quotas.refresh", _to_float),
)


def _toml_lookup(table: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = table
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _unknown_toml_keys(table: Mapping[str, Any]) -> list[str]:
    known = {spec.toml for spec in SPECS}
    sections = {key.split(".")[0] for key in known}
    unknown: list[str] = []
    for section, body in table.items():
        if section not in sections or not isinstance(body, Mapping):
            unknown.append(section)
            continue
        for key in body:
            dotted = f"{section}.{key}"
            if dotted not in known:
                unknown.append(dotted)
    return unknown


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    dotenv_file: str | os.PathLike[str] | None = ".env",
) -> Settings:
    """Build the settings; raise `SettingsError` naming every bad or missing setting."""
    env = dict(os.environ if environ is None else environ)
    problems: list[str] = []
    dotenv: dict[str, str] = {}
    if dotenv_file is not None and Path(dotenv_file).is_file():
        dotenv = {k: v for k, v in dotenv_values(dotenv_file).items() if v is not None}
    merged = {**dotenv, **env}

    toml_table: dict[str, Any] = {}
    config_path = config_file or merged.get("NOTIFYD_CONFIG")
    if config_path:
        try:
            toml_table = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        except OSError as exc:
            problems.append(f"NOTIFYD_CONFIG: cannot read {config_path}: {exc.strerror}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"NOTIFYD_CONFIG: {config_path} is not valid TOML: {exc}")
        problems += [
            f"{config_path}: unknown key {key!r}" for key in _unknown_toml_keys(toml_table)
        ]

    values: dict[str, Any] = {}
    for spec in SPECS:
        source, raw = "", None
        for name in spec.env:
            if name in merged:
                source, raw = name, merged[name]
                break
        else:
            found, raw = _toml_lookup(toml_table, spec.toml)
            if not found:
                continue
            source = f"{config_path} [{spec.toml}]"
        try:
            values[spec.name] = spec.parse(raw)
        except ValueError as exc:
            problems.append(f"{source}: {exc}")

    # Validate what did parse too, so one run names every problem. Defaults stand in for the
    # values that did not parse; being valid on their own, they add no second report.
    settings = Settings(**values)
    problems += validate(settings)
    if problems:
        raise SettingsError(problems)
    return settings


def validate(settings: Settings) -> list[str]:
    """Cross-field checks: the things a running daemon would otherwise discover too late."""
    problems: list[str] = []
    if not 0 <= settings.port < 65536:  # 0: any free port (tests, several local instances)
        problems.append(f"NOTIFYD_PORT: {settings.port} is not a TCP port")
    if urlsplit(settings.database_url).scheme not in {"postgres", "postgresql"}:
        problems.append("DATABASE_URL: must be a postgresql:// URL")
    if settings.redis_url and urlsplit(settings.redis_url).scheme not in {
        "redis",
        "rediss",
        "unix",
    }:
        problems.append("REDIS_URL: must be a redis://, rediss:// or unix:// URL")
    if not 0 < settings.redis_port < 65536:
        problems.append(f"REDIS_PORT: {settings.redis_port} is not a TCP port")
    if settings.instance_name and not re.fullmatch(
        r"[A-Za-z0-9_.:-]{1,64}", settings.instance_name
    ):
        problems.append("NOTIFYD_INSTANCE_NAME: 1-64 letters, digits and _ . : -")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", settings.redis_prefix):
        problems.append("NOTIFYD_REDIS_PREFIX: use letters, digits and _ . : - only")
    if settings.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        problems.append("NOTIFYD_LOG_LEVEL: one of debug, info, warning, error, critical")
    if settings.log_format not in {"auto", "json", "text"}:
        problems.append("NOTIFYD_LOG_FORMAT: one of auto, json, text")
    if settings.db_pool_min < 1 or settings.db_pool_max < settings.db_pool_min:
        problems.append("NOTIFYD_DB_POOL_MIN/MAX: need 1 <= min <= max")
    if not (settings.jwt_secret or settings.jwt_public_key_file or settings.jwt_jwks_url):
        problems.append(
            "JWT_SECRET: missing; set it (HS256), "
            "or JWT_PUBLIC_KEY_FILE / JWT_JWKS_URL (RS256/ES256)"
        )
    elif settings.jwt_secret and len(settings.jwt_secret) < 16:
        problems.append(
            "JWT_SECRET: too short, use at least 16 characters (32 random bytes is better)"
        )
    for alg in settings.effective_jwt_algorithms:
        if alg == "none" or not re.fullmatch(r"(HS|RS|PS|ES)(256|384|512)|EdDSA", alg):
            problems.append(f"JWT_ALGORITHMS: {alg!r} is not an accepted signing algorithm")
        elif alg.startswith("HS") and not settings.jwt_secret:
            problems.append(f"JWT_ALGORITHMS: {alg} needs JWT_SECRET")
        elif not alg.startswith("HS") and not (
            settings.jwt_public_key_file or settings.jwt_jwks_url
        ):
            problems.append(f"JWT_ALGORITHMS: {alg} needs JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL")
    if settings.jwt_public_key_file and not Path(settings.jwt_public_key_file).is_file():
        problems.append(f"JWT_PUBLIC_KEY_FILE: no file at {settings.jwt_public_key_file}")
    if settings.jwt_jwks_url and urlsplit(settings.jwt_jwks_url).scheme not in {"http", "https"}:
        problems.append("JWT_JWKS_URL: must be an http(s):// URL")
    if settings.jwt_expiry <= 0:
        problems.append("JWT_EXPIRY: must be a positive number of seconds")
    if settings.email_use_tls and settings.email_use_ssl:
        problems.append("EMAIL_USE_TLS/EMAIL_USE_SSL: choose one (STARTTLS or implicit TLS)")
    for address in settings.recipient_list:
        if "@" not in address:
            problems.append(f"RECIPIENT_LIST: {address!r} is not an email address")
    try:
        re.compile(settings.id_pattern)
    except re.error as exc:
        problems.append(f"NOTIFYD_ID_PATTERN: not a regular expression: {exc}")
    positive = {
        "NOTIFYD_MAX_BODY_BYTES": settings.max_body_bytes,
        "NOTIFYD_MESSAGE_MAX_LENGTH": settings.message_max_length,
        "NOTIFYD_SUBJECT_MAX_LENGTH": settings.subject_max_length,
        "NOTIFYD_NOTIFICATION_MAX_LENGTH": settings.notification_max_length,
        "NOTIFYD_TEMPLATE_MAX_OUTPUT": settings.template_max_output,
        "NOTIFYD_TEMPLATE_MAX_STEPS": settings.template_max_steps,
        "NOTIFYD_ID_MAX_LENGTH": settings.id_max_length,
        "NOTIFYD_PAGE_SIZE_DEFAULT": settings.page_size_default,
        "NOTIFYD_PAGE_SIZE_MAX": settings.page_size_max,
        "NOTIFYD_SHUTDOWN_TIMEOUT": settings.shutdown_timeout,
        "NOTIFYD_IDEMPOTENCY_TTL": settings.idempotency_ttl,
        "NOTIFYD_SWEEP_INTERVAL": settings.sweep_interval,
        "NOTIFYD_STREAM_STATS_INTERVAL": settings.stream_stats_interval,
        "NOTIFYD_WS_HEARTBEAT": settings.ws_heartbeat,
        "NOTIFYD_WS_MAX_FRAME": settings.ws_max_frame,
        "NOTIFYD_WS_MESSAGE_RATE": settings.ws_message_rate,
        "NOTIFYD_WS_SEND_BUFFER": settings.ws_send_buffer,
        "NOTIFYD_REDIS_MAX_CONNECTIONS": settings.redis_max_connections,
        "NOTIFYD_REDIS_TIMEOUT": settings.redis_timeout,
        "NOTIFYD_READY_TIMEOUT": settings.ready_timeout,
        "NOTIFYD_DB_COMMAND_TIMEOUT": settings.db_command_timeout,
        "NOTIFYD_DB_ACQUIRE_TIMEOUT": settings.db_acquire_timeout,
        "NOTIFYD_COMMIT_TIMEOUT": settings.commit_timeout,
        "NOTIFYD_WS_MESSAGE_BURST": settings.ws_message_burst,
        "NOTIFYD_WS_PRESENCE_TTL": settings.ws_presence_ttl,
        "NOTIFYD_CHAT_WRITE_BATCH": settings.chat_write_batch,
        "NOTIFYD_ROOM_MAX_MEMBERS": settings.room_max_members,
        "NOTIFYD_WS_SEND_QUEUE": settings.ws_send_queue,
        "NOTIFYD_WS_HISTORY_LEN": settings.ws_history_len,
        "NOTIFYD_WS_HISTORY_TTL": settings.ws_history_ttl,
        "NOTIFYD_WS_REPLAY_MAX_ENTRIES": settings.ws_replay_max_entries,
        "NOTIFYD_WS_REPLAY_MAX_BYTES": settings.ws_replay_max_bytes,
        "NOTIFYD_RETAIN_BATCH": settings.retain_batch,
        "NOTIFYD_SEND_MAX_ATTEMPTS": settings.send_max_attempts,
        "NOTIFYD_RETRY_BASE": settings.retry_base,
        "NOTIFYD_RETRY_CAP": settings.retry_cap,
        "NOTIFYD_SEND_TIMEOUT": settings.send_timeout,
        "NOTIFYD_CLAIM_IDLE": settings.claim_idle,
        "NOTIFYD_STREAM_BLOCK": settings.stream_block,
        "NOTIFYD_STREAM_MAX_LEN": settings.stream_max_len,
        "NOTIFYD_REMINDER_LATE_AFTER": settings.reminder_late_after,
        "NOTIFYD_REQUEUE_AFTER": settings.requeue_after,
        "NOTIFYD_EMAIL_CONCURRENCY": settings.email_concurrency,
        "NOTIFYD_SMS_CONCURRENCY": settings.sms_concurrency,
        "NOTIFYD_INAPP_CONCURRENCY": settings.inapp_concurrency,
        "NOTIFYD_DISPATCH_CONCURRENCY": settings.dispatch_concurrency,
        "NOTIFYD_SMTP_CONNECTIONS_PER_TENANT": settings.smtp_connections_per_tenant,
        "NOTIFYD_SMTP_CONNECT_TIMEOUT": settings.smtp_connect_timeout,
        "NOTIFYD_TENANT_SEND_CONCURRENCY": settings.tenant_send_concurrency,
        "NOTIFYD_TENANT_PARK_DELAY": settings.tenant_park_delay,
        "NOTIFYD_BREAKER_FAILURES": settings.breaker_failures,
        "NOTIFYD_BREAKER_COOLDOWN": settings.breaker_cooldown,
        "NOTIFYD_ALERT_INTERVAL": settings.alert_interval,
        "NOTIFYD_EGRESS_RESOLVE_TIMEOUT": settings.egress_resolve_timeout,
        "NOTIFYD_EGRESS_RESOLVE_THREADS": settings.egress_resolve_threads,
        "NOTIFYD_ACTOR_BACKOFF_CAP": settings.actor_backoff_cap,
        "NOTIFYD_ACTOR_MAX_RESTARTS": settings.actor_max_restarts,
        "NOTIFYD_ACTOR_RESTART_WINDOW": settings.actor_restart_window,
        "NOTIFYD_EVENT_CONCURRENCY": settings.event_concurrency,
        "NOTIFYD_EVENT_MAX_RECIPIENTS": settings.event_max_recipients,
        "NOTIFYD_EVENT_MAX_DELIVERIES": settings.event_max_deliveries,
    }
    problems += [f"{name}: must be greater than 0" for name, v in positive.items() if v <= 0]
    kept = {  # 0 keeps forever
        "NOTIFYD_EVENT_DEDUPE_TTL": settings.event_dedupe_ttl,
        "NOTIFYD_RETAIN_NOTIFICATIONS": settings.retain_notifications,
        "NOTIFYD_RETAIN_MESSAGES": settings.retain_messages,
        "NOTIFYD_RETAIN_REMINDERS": settings.retain_reminders,
        "NOTIFYD_RETAIN_AUDIT": settings.retain_audit,
    }
    problems += [
        f"{name}: must be 0 or more (0 keeps forever)" for name, v in kept.items() if v < 0
    ]
    if settings.retain_pause < 0:
        problems.append("NOTIFYD_RETAIN_PAUSE: must be 0 or more seconds")
    if settings.retain_batch > 10_000:
        problems.append(
            "NOTIFYD_RETAIN_BATCH: at most 10000 rows a statement (a larger batch holds its "
            "row locks and its WAL burst long enough to slow the request path)"
        )
    if not 0 <= settings.reminder_lookahead <= MAX_REMINDER_LOOKAHEAD:
        problems.append(
            f"NOTIFYD_REMINDER_LOOKAHEAD: must be between 0 and {MAX_REMINDER_LOOKAHEAD:g} "
            "seconds (a reminder read early waits that long in the firer)"
        )
    elif settings.reminder_lookahead >= settings.claim_idle:
        problems.append(
            "NOTIFYD_REMINDER_LOOKAHEAD: must be shorter than NOTIFYD_CLAIM_IDLE, or a reminder "
            "waiting for its time is taken over as if its reader had died"
        )
    if not (math.isfinite(settings.ws_token_warning) and settings.ws_token_warning >= 0):
        problems.append("NOTIFYD_WS_TOKEN_WARNING: a number of seconds, 0 or more (0: no warning)")
    if settings.redis_timeout < settings.stream_block + 1:
        problems.append(
            "NOTIFYD_REDIS_TIMEOUT: must be at least NOTIFYD_STREAM_BLOCK + 1 s, or every "
            "stream read that waits its whole block time would count as a hung Redis"
        )
    if settings.send_timeout >= settings.shutdown_timeout:
        problems.append(
            "NOTIFYD_SEND_TIMEOUT: must be shorter than NOTIFYD_SHUTDOWN_TIMEOUT, so a send in "
            "flight at SIGTERM can finish instead of being cut off"
        )
    if settings.tenant_send_queue < 0:
        problems.append("NOTIFYD_TENANT_SEND_QUEUE: must be 0 or more")
    if settings.send_timeout >= settings.claim_idle:
        problems.append(
            "NOTIFYD_SEND_TIMEOUT: must be shorter than NOTIFYD_CLAIM_IDLE, or a slow send "
            "would be taken over by another instance while still running"
        )
    if settings.preferences_url:
        try:
            settings.preferences_url.format(tenant_id="t", user_id="u", category="c")
        except (KeyError, IndexError, ValueError):
            problems.append(
                "NOTIFYD_PREFERENCES_URL: may use only {tenant_id}, {user_id} and {category}"
            )
    if not re.fullmatch(r"[A-Z]{2}", settings.default_region):
        problems.append("NOTIFYD_DEFAULT_REGION: a two-letter country code such as US or GB")
    if settings.public_url and urlsplit(settings.public_url).scheme not in {"http", "https"}:
        problems.append("NOTIFYD_PUBLIC_URL: must be an http(s):// URL")
    if settings.twilio_base_url and urlsplit(settings.twilio_base_url).scheme not in {
        "http",
        "https",
    }:
        problems.append("TWILIO_API_BASE_URL: must be an http(s):// URL")
    if settings.page_size_default > settings.page_size_max:
        problems.append("NOTIFYD_PAGE_SIZE_DEFAULT: must not exceed NOTIFYD_PAGE_SIZE_MAX")
    if settings.rabbitmq_url and urlsplit(settings.rabbitmq_url).scheme not in {"amqp", "amqps"}:
        problems.append("NOTIFYD_RABBITMQ_URL: must be an amqp:// or amqps:// URL")
    if not 0 < len(settings.rabbitmq_queue.encode()) <= 255:
        problems.append("NOTIFYD_RABBITMQ_QUEUE: a queue name of 1-255 bytes")
    elif settings.rabbitmq_queue.startswith("amq."):
        problems.append("NOTIFYD_RABBITMQ_QUEUE: names starting with amq. are the broker's")
    problems += _limit_problems(settings)
    if not 0 < settings.rabbitmq_prefetch <= 65535:  # AMQP's prefetch-count is 16 bits
        problems.append("NOTIFYD_RABBITMQ_PREFETCH: between 1 and 65535")
    for name, tenants in (
        ("NOTIFYD_EVENTS_TENANTS", settings.events_tenants),
        ("NOTIFYD_RABBITMQ_TENANTS", settings.rabbitmq_tenants),
    ):
        if not tenants:
            problems.append(
                f"{name}: list the tenants the source may publish for, or * for all (to "
                "switch ingestion off: NOTIFYD_EVENTS_ENABLED=false)"
            )
        elif "*" in tenants and len(tenants) > 1:
            problems.append(f"{name}: * (every tenant) or a list of tenants, not both")
    return problems


def _limit_problems(settings: Settings) -> list[str]:
    """Rates, quotas and caps: 0 is "unlimited", a negative value is a mistake, and a rate
    needs a burst of at least one send."""
    problems = [
        f"{name}: must be 0 (unlimited) or more"
        for name, value in (
            ("NOTIFYD_RATE_USER", settings.rate_user),
            ("NOTIFYD_RATE_SERVICE", settings.rate_service),
            ("NOTIFYD_RATE_TENANT", settings.rate_tenant),
            ("NOTIFYD_QUOTA_EMAIL_DAILY", settings.quota_email_daily),
            ("NOTIFYD_QUOTA_SMS_DAILY", settings.quota_sms_daily),
            ("NOTIFYD_WS_MAX_PER_USER", settings.ws_max_per_user),
            ("NOTIFYD_WS_MAX_PER_TENANT", settings.ws_max_per_tenant),
        )
        if value < 0
    ]
    problems += [
        f"{name}: must be at least 1 (sends allowed at once)"
        for name, value in (
            ("NOTIFYD_RATE_USER_BURST", settings.rate_user_burst),
            ("NOTIFYD_RATE_SERVICE_BURST", settings.rate_service_burst),
            ("NOTIFYD_RATE_TENANT_BURST", settings.rate_tenant_burst),
        )
        if value < 1
    ]
    if settings.limits_refresh <= 0:
        problems.append("NOTIFYD_LIMITS_REFRESH: must be greater than 0")
    return problems


def mask_url(url: str) -> str:
    """The URL with any password replaced, so it can be printed or logged: in the user part
    (`redis://:secret@host`) or as a query parameter (`unix:///run/redis.sock?password=…`,
    libpq's `?password=`)."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)
        user = parts.username or ""
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))
    head, question, rest = url.partition("?")
    if not question:
        return url
    # by hand, not urlunsplit: that would turn `unix:///path` into `unix:/path`
    query, hash_mark, fragment = rest.partition("#")
    pairs = query.split("&")
    for i, pair in enumerate(pairs):
        name = pair.partition("=")[0]
        if name.lower() == "password":
            pairs[i] = f"{name}=***"
    return f"{head}?{'&'.join(pairs)}{hash_mark}{fragment}"


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(environment name, TOML key, shown value) for every setting, secrets masked."""
    rows: list[tuple[str, str, str]] = []
    by_name = {f.name: getattr(settings, f.name) for f in fields(settings)}
    for spec in SPECS:
        value = by_name[spec.name]
        if spec.name in {"database_url", "redis_url", "rabbitmq_url"}:
            shown = mask_url(str(value))
        elif spec.secret:
            shown = "***" if value else "(unset)"
        elif spec.name == "egress_allowed_ports" and not value:
            shown = "any"
        elif isinstance(value, tuple):
            shown = ",".join(map(str, value))
        elif isinstance(value, Mapping):
            shown = ";".join(f"{role}={','.join(sorted(ch))}" for role, ch in value.items())
        else:
            shown = str(value)
        rows.append((spec.env[0], spec.toml, shown))
    rows.append(("(derived)", "redis url", mask_url(settings.effective_redis_url)))
    rows.append(("(derived)", "jwt algorithms", ",".join(settings.effective_jwt_algorithms)))
    return rows
