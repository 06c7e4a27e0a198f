"""The one declaration of every setting: `Settings`, a frozen pydantic dataclass.

Each field is declared once with `setting(default, ENV_NAME, "section.key", "help", bounds)`:
its attribute name (read as `settings.xxx` everywhere), its environment name(s) (the first is
notifyd's own, or the seed's: `DATABASE_URL`, `REDIS_HOST`, `EMAIL_HOST`, `JWT_SECRET`,
`TWILIO_*`; later ones are older spellings), its TOML path, its type (the annotation), default,
bounds and one line of help. The loader (`load.py`), `notifyd check-config`,
`config/notifyd.example.toml` and `docs/settings.md` are all read off this class.

A rule about one value is a bound or an annotated validator on its field, so pydantic reports
every field at fault at once; rules across fields are the model validator at the end.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import quote, urlsplit

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass

from notifyd.settings.values import (
    DEFAULT_ID_PATTERN,
    DEFAULT_SEND_POLICY,
    EGRESS_DEFAULT_PORTS,
    MAX_REMINDER_LOOKAHEAD,
    WEBHOOK_DEFAULT_PORTS,
    Network,
    parse_send_policy,
    parse_user_tenants,
    tenants_list,
    to_bool,
    to_float,
    to_int,
    to_list,
    to_networks,
    to_ports,
    to_str,
)


class SettingsError(Exception):
    """Raised with every problem found, each naming the setting at fault."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _check(test: Callable[[Any], bool], message: str) -> AfterValidator:
    """A rule on one value: `message` (which must not quote a secret) when `test` fails."""

    def run(value: Any) -> Any:
        if not test(value):
            raise ValueError(message)
        return value

    return AfterValidator(run)


def _url(*schemes: str, empty: bool = True) -> AfterValidator:
    """A URL of one of `schemes` (or empty, when `empty`)."""
    names = " or ".join(f"{s}://" for s in schemes)
    return _check(
        lambda v: (empty and not v) or urlsplit(v).scheme in schemes, f"must be a {names} URL"
    )


def _regex_ok(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def _template_ok(text: str) -> bool:
    try:
        text.format(tenant_id="t", user_id="u", category="c")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def _addresses_ok(addresses: tuple[str, ...]) -> tuple[str, ...]:
    for address in addresses:
        if "@" not in address:
            raise ValueError(f"{address!r} is not an email address")
    return addresses


# fmt: off
# the types a setting may have: each parses both the environment's text and TOML's values
Str = Annotated[str, BeforeValidator(to_str)]
Int = Annotated[int, BeforeValidator(to_int)]
Float = Annotated[float, BeforeValidator(to_float)]
Bool = Annotated[bool, BeforeValidator(to_bool)]
Strs = Annotated[tuple[str, ...], BeforeValidator(to_list)]
Networks = Annotated[tuple[Network, ...], BeforeValidator(to_networks)]
Ports = Annotated[tuple[int, ...], BeforeValidator(to_ports)]
Policy = Annotated[Mapping[str, frozenset[str]], BeforeValidator(parse_send_policy)]
UserTenants = Annotated[Mapping[str, frozenset[str]], BeforeValidator(parse_user_tenants)]
Tenants = Annotated[tuple[str, ...], BeforeValidator(to_list), AfterValidator(tenants_list)]
# what each parser reads, for docs/settings.md
TYPE_NAMES: dict[Callable[[Any], Any], str] = {
    to_str: "string", to_int: "integer", to_float: "number", to_bool: "boolean",
    to_list: "list of strings", to_networks: "list of IP addresses or networks",
    to_ports: 'list of TCP ports, or "any"', parse_send_policy: "table: role → channels",
    parse_user_tenants: "table: broker user → tenants",
}
# and the types with a rule of their own
LEVELS = ("debug", "info", "warning", "error", "critical")
LogLevel = Annotated[Str, _check(lambda v: v.lower() in LEVELS, "one of " + ", ".join(LEVELS))]
LogFormat = Annotated[Str, _check(lambda v: v in ("auto", "json", "text"), "auto, json or text")]
RateScope = Annotated[Str, _check(lambda v: v in ("ip", "global"), "ip or global")]
UnsubscribeSecret = Annotated[Str, _check(lambda v: not v or len(v) >= 32,
    "at least 32 characters (a random secret)")]
InstanceName = Annotated[Str, _check(lambda v: not v or re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v),
    "1-64 letters, digits and _ . : -")]
KeyPrefix = Annotated[Str, _check(lambda v: re.fullmatch(r"[A-Za-z0-9_.:-]+", v),
    "use letters, digits and _ . : - only")]
PostgresUrl = Annotated[Str, _url("postgresql", "postgres", empty=False)]
RedisUrl = Annotated[Str, _url("redis", "rediss", "unix")]
HttpUrl = Annotated[Str, _url("http", "https")]
TenantConfigUrl = Annotated[
    HttpUrl,
    _check(lambda v: not v or "{tenant_id}" in v, "must contain {tenant_id}"),
]
AmqpUrl = Annotated[Str, _url("amqp", "amqps")]
Addresses = Annotated[Strs, AfterValidator(_addresses_ok)]
JwtSecret = Annotated[Str, _check(lambda v: not v or len(v) >= 16,
    "too short, use at least 16 characters (32 random bytes is better)")]
KeyFile = Annotated[Str, _check(lambda v: not v or Path(v).is_file(), "no file at that path")]
Pattern = Annotated[Str, _check(_regex_ok, "not a regular expression")]
UrlTemplate = Annotated[Str, _check(_template_ok,
    "may use only {tenant_id}, {user_id} and {category}")]
Region = Annotated[Str, _check(lambda v: re.fullmatch(r"[A-Z]{2}", v),
    "a two-letter country code such as US or GB")]
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
KafkaServers = Annotated[Strs, _check(lambda v: all(re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+:\d{1,5}", s)
    for s in v), "host:port, comma-separated (e.g. kafka:9092)")]
KafkaTopics = Annotated[Strs, _check(lambda v: len(v) <= 100 and all(
    re.fullmatch(r"[A-Za-z0-9._-]{1,249}", t) for t in v),
    "at most 100 topic names of 1-249 letters, digits and . _ -")]
KafkaTopic = Annotated[Str, _check(lambda v: not v or re.fullmatch(r"[A-Za-z0-9._-]{1,249}", v),
    "a topic name of 1-249 letters, digits and . _ - (or empty)")]
KafkaGroup = Annotated[Str, _check(lambda v: re.fullmatch(r"[A-Za-z0-9._-]{1,249}", v),
    "1-249 letters, digits and . _ -")]
KafkaProtocol = Annotated[Str, _check(lambda v: v in KAFKA_PROTOCOLS, ", ".join(KAFKA_PROTOCOLS))]
KafkaSasl = Annotated[Str, _check(lambda v: not v or v in KAFKA_SASL_MECHANISMS,
    ", ".join(KAFKA_SASL_MECHANISMS) + " (or empty)")]
QueueName = Annotated[Str,
    _check(lambda v: 0 < len(v.encode()) <= 255, "a queue name of 1-255 bytes"),
    _check(lambda v: not v.startswith("amq."), "names starting with amq. are the broker's")]
# fmt: on


def setting(
    default: Any,
    env: str | tuple[str, ...],
    toml: str,
    doc: str,
    *,
    secret: bool = False,
    note: str = "",
    factory: Callable[[], Any] | None = None,
    **bounds: float,
) -> Any:
    """One setting's whole declaration: `bounds` are pydantic's `ge`, `gt`, `le`, `lt`; `note`
    says why they are what they are (added to the problem when one is broken); a `secret` is
    kept out of `repr` and masked by `check-config`."""
    names = (env,) if isinstance(env, str) else env
    extra = {"env": list(names), "toml": toml, "secret": secret, "note": note}
    common: dict[str, Any] = {
        "validation_alias": AliasChoices(*names),
        "description": doc,
        "repr": not secret,
        "json_schema_extra": extra,
        **bounds,
    }
    if factory is not None:
        return Field(default_factory=factory, **common)
    return Field(default, **common)


FOREVER = "0 keeps forever"
UNLIMITED = "0 is unlimited"


# A pydantic dataclass, not a BaseModel: a plain frozen dataclass to the rest of the code
# (`dataclasses.replace` works, `FrozenInstanceError` on a write) whose attribute reads are
# plain instance reads; BaseModel's `__getattr__` keeps CPython from specialising them (see
# docs/architecture.md, "Settings declared once").
@dataclass(
    frozen=True,
    config=ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, loc_by_alias=False
    ),
)
class Settings:
    """The daemon's configuration, read once at start; frozen, secrets kept out of `repr`."""

    # fmt: off
    # --- server
    host: Str = setting("127.0.0.1", "NOTIFYD_HOST", "server.host", "address to listen on")
    port: Int = setting(8000, "NOTIFYD_PORT", "server.port", "port (0: any free port)", ge=0,
        le=65535)
    debug: Bool = setting(False, "DEBUG", "server.debug", "readable logs instead of JSON")
    log_level: LogLevel = setting("info", "NOTIFYD_LOG_LEVEL", "server.log_level",
        "debug, info, warning, error or critical")
    log_format: LogFormat = setting("auto", "NOTIFYD_LOG_FORMAT", "server.log_format",
        "auto (text on a terminal or with DEBUG), json or text")
    shutdown_timeout: Float = setting(15.0, "NOTIFYD_SHUTDOWN_TIMEOUT", "server.shutdown_timeout",
        "seconds in-flight work gets on SIGTERM", gt=0)
    ready_timeout: Float = setting(2.0, "NOTIFYD_READY_TIMEOUT", "server.ready_timeout",
        "seconds each /readyz and watchdog check of PostgreSQL and Redis may take", gt=0)
    instance_name: InstanceName = setting("", "NOTIFYD_INSTANCE_NAME", "server.instance_name",
        "consumer name in Redis groups (empty: host-pid)")
    trusted_proxies: Networks = setting((), "NOTIFYD_TRUSTED_PROXIES", "server.trusted_proxies",
        "proxies (addresses or networks) whose X-Forwarded-For names the client")
    # --- database
    database_url: PostgresUrl = setting("postgresql://postgres@127.0.0.1:5432/notifyd",
        "DATABASE_URL", "database.url", "PostgreSQL to connect to", secret=True)
    db_pool_min: Int = setting(2, "NOTIFYD_DB_POOL_MIN", "database.pool_min",
        "connections kept open", ge=1)
    db_pool_max: Int = setting(20, "NOTIFYD_DB_POOL_MAX", "database.pool_max",
        "connections at most (at least pool_min)", ge=1)
    db_keyed_pool_max: Int = setting(8, "NOTIFYD_DB_KEYED_POOL_MAX", "database.keyed_pool_max",
        "connections of the dispatcher's keyed statements (batches found by key)", ge=1)
    db_command_timeout: Float = setting(10.0, "NOTIFYD_DB_COMMAND_TIMEOUT",
        "database.command_timeout", "seconds per statement", gt=0)
    # a hung PostgreSQL holds every connection, and the queue for them would grow forever
    db_acquire_timeout: Float = setting(5.0, "NOTIFYD_DB_ACQUIRE_TIMEOUT",
        "database.acquire_timeout",
        "longest wait for a pooled connection, seconds (then 503 / the actor retries)", gt=0)
    commit_timeout: Float = setting(10.0, "NOTIFYD_COMMIT_TIMEOUT", "database.commit_timeout",
        "longest a send waits for its group commit, seconds (then 503; docs/limits.md)", gt=0)
    # --- redis
    redis_url: RedisUrl = setting("", "REDIS_URL", "redis.url",
        "redis://, rediss:// (TLS) or unix:// URL; empty: built from host, port, db, password",
        secret=True)
    redis_host: Str = setting("localhost", "REDIS_HOST", "redis.host",
        "Redis host, when url is empty")
    redis_port: Int = setting(6379, "REDIS_PORT", "redis.port", "Redis port, when url is empty",
        gt=0, lt=65536)
    redis_db: Int = setting(0, "REDIS_DB", "redis.db", "Redis database number, when url is empty",
        ge=0)
    redis_password: Str = setting("", "REDIS_PASSWORD", "redis.password",
        "Redis password, when url is empty", secret=True)
    redis_prefix: KeyPrefix = setting("notifyd", "NOTIFYD_REDIS_PREFIX", "redis.prefix",
        "every key starts with it")
    redis_max_connections: Int = setting(64, "NOTIFYD_REDIS_MAX_CONNECTIONS",
        "redis.max_connections", "pool size; past it commands wait for a free one (up to timeout)",
        gt=0)
    # a hung Redis raises TimeoutError instead of holding its caller forever
    redis_timeout: Float = setting(5.0, "NOTIFYD_REDIS_TIMEOUT", "redis.timeout",
        "seconds per command, connect and pool wait; at least delivery.stream_block + 1", gt=0)
    # --- email: the global SMTP relay; tenants may configure their own
    email_host: Str = setting("localhost", "EMAIL_HOST", "email.host", "SMTP relay host")
    email_port: Int = setting(25, "EMAIL_PORT", "email.port", "SMTP relay port", gt=0, lt=65536)
    email_host_user: Str = setting("", "EMAIL_HOST_USER", "email.user",
        "SMTP user (empty: no login)")
    email_host_password: Str = setting("", "EMAIL_HOST_PASSWORD", "email.password", "SMTP password",
        secret=True)
    email_use_tls: Bool = setting(False, "EMAIL_USE_TLS", "email.use_tls",
        "STARTTLS after connecting")
    email_use_ssl: Bool = setting(False, "EMAIL_USE_SSL", "email.use_ssl",
        "implicit TLS (port 465); not with use_tls")
    email_from: Str = setting("notifyd@localhost", ("EMAIL_FROM", "DEFAULT_FROM_EMAIL"),
        "email.from", "sender address")
    recipient_list: Addresses = setting((), "RECIPIENT_LIST", "email.recipient_list",
        "admins alerted of failures (comma-separated in the environment)")
    # --- auth
    jwt_secret: JwtSecret = setting("", "JWT_SECRET", "auth.jwt_secret", "enables HS256 tokens",
        secret=True)
    jwt_expiry: Int = setting(3600, "JWT_EXPIRY", "auth.jwt_expiry",
        "lifetime of tokens made by `notifyd token`, seconds", gt=0)
    jwt_algorithms: Strs = setting((), "JWT_ALGORITHMS", "auth.algorithms",
        "accepted signing algorithms (empty: HS256 with a secret, RS256 and ES256 with a key)")
    jwt_public_key_file: KeyFile = setting("", "JWT_PUBLIC_KEY_FILE", "auth.public_key_file",
        "PEM public key (or a JWKS JSON file)")
    jwt_jwks_url: HttpUrl = setting("", "JWT_JWKS_URL", "auth.jwks_url",
        "keys fetched, cached, refreshed on an unknown kid")
    jwt_jwks_cache_seconds: Float = setting(300.0, "JWT_JWKS_CACHE_SECONDS",
        "auth.jwks_cache_seconds", "seconds fetched keys are kept", gt=0)
    jwt_issuer: Str = setting("", "JWT_ISSUER", "auth.issuer", "checked when set")
    jwt_audience: Str = setting("", "JWT_AUDIENCE", "auth.audience", "checked when set")
    jwt_leeway: Float = setting(30.0, "JWT_LEEWAY", "auth.leeway",
        "clock skew allowed on exp/nbf/iat, seconds", ge=0)
    jwt_tenant_claim: Str = setting("tenant_id", "JWT_TENANT_CLAIM", "auth.tenant_claim",
        "claim naming the tenant (a dotted path reaches nested claims)")
    jwt_user_claim: Str = setting("user_id", "JWT_USER_CLAIM", "auth.user_claim",
        "claim naming the user (`sub` when it is absent)")
    jwt_role_claim: Str = setting("role", "JWT_ROLE_CLAIM", "auth.role_claim",
        "claim naming the role (a string or a list): user, service or admin")
    send_policy: Policy = setting(None, "NOTIFYD_SEND_POLICY", "auth.send_policy",
        "which roles may send which channels (env: role=channel,channel;role=...); a role not "
        "named sends nothing; give `user` email and sms only when every token holder is trusted",
        factory=lambda: parse_send_policy(DEFAULT_SEND_POLICY))
    # --- twilio
    twilio_account_sid: Str = setting("", "TWILIO_ACCOUNT_SID", "twilio.account_sid",
        "the platform's Twilio account")
    twilio_auth_token: Str = setting("", "TWILIO_AUTH_TOKEN", "twilio.auth_token", "its auth token",
        secret=True)
    twilio_phone: Str = setting("", "TWILIO_PHONE", "twilio.phone",
        "the sending number (national forms read with default_region)")
    twilio_base_url: HttpUrl = setting("", "TWILIO_API_BASE_URL", "twilio.api_base_url",
        "another Messages API endpoint (a local stand-in)")
    # --- limits
    max_body_bytes: Int = setting(1_048_576, "NOTIFYD_MAX_BODY_BYTES", "limits.max_body_bytes",
        "larger request bodies get 413", gt=0)
    message_max_length: Int = setting(10_000, "NOTIFYD_MESSAGE_MAX_LENGTH",
        "limits.message_max_length", "characters in a 1-on-1 message", gt=0)
    subject_max_length: Int = setting(500, "NOTIFYD_SUBJECT_MAX_LENGTH",
        "limits.subject_max_length", "characters in a subject", gt=0)
    notification_max_length: Int = setting(100_000, "NOTIFYD_NOTIFICATION_MAX_LENGTH",
        "limits.notification_max_length", "characters in a notification's body", gt=0)
    context_max_keys: Int = setting(200, "NOTIFYD_CONTEXT_MAX_KEYS", "limits.context_max_keys",
        "template context entries", gt=0)
    template_max_output: Int = setting(1_000_000, "NOTIFYD_TEMPLATE_MAX_OUTPUT",
        "limits.template_max_output",
        "characters one rendered template field may output (and, counted apart, build on the way)",
        gt=0)
    template_max_steps: Int = setting(100_000, "NOTIFYD_TEMPLATE_MAX_STEPS",
        "limits.template_max_steps",
        "loop iterations, calls and elements walked in one field's render", gt=0)
    id_max_length: Int = setting(128, "NOTIFYD_ID_MAX_LENGTH", "limits.id_max_length",
        "characters in ids from other services (tenant, user...)", gt=0)
    id_pattern: Pattern = setting(DEFAULT_ID_PATTERN, "NOTIFYD_ID_PATTERN", "limits.id_pattern",
        "the characters those ids may use (a regular expression)")
    page_size_default: Int = setting(50, "NOTIFYD_PAGE_SIZE_DEFAULT", "limits.page_size_default",
        "items in a page when the request names none", gt=0)
    page_size_max: Int = setting(200, "NOTIFYD_PAGE_SIZE_MAX", "limits.page_size_max",
        "items in a page at most", gt=0)
    mark_read_max_ids: Int = setting(1000, "NOTIFYD_MARK_READ_MAX_IDS", "limits.mark_read_max_ids",
        "ids in one mark-as-read request", gt=0)
    workflow_max_steps: Int = setting(10, "NOTIFYD_WORKFLOW_MAX_STEPS", "limits.workflow_max_steps",
        "steps in one workflow", gt=0, le=100)
    workflow_max_delay: Float = setting(2_592_000.0, "NOTIFYD_WORKFLOW_MAX_DELAY",
        "limits.workflow_max_delay",
        "seconds a workflow's step delay, digest window or throttle period may be at most", gt=0)
    workflow_max_recipients: Int = setting(1000, "NOTIFYD_WORKFLOW_MAX_RECIPIENTS",
        "limits.workflow_max_recipients", "recipients of one trigger (or cancel)", gt=0)
    workflow_digest_max_items: Int = setting(100, "NOTIFYD_WORKFLOW_DIGEST_MAX_ITEMS",
        "limits.workflow_digest_max_items",
        "triggers merged into one digest run (the next opens another)", gt=0, le=10_000)
    workflows_per_tenant: Int = setting(1000, "NOTIFYD_WORKFLOWS_PER_TENANT",
        "limits.workflows_per_tenant", "workflow definitions one tenant may keep", gt=0)
    idempotency_ttl: Float = setting(86_400.0, "NOTIFYD_IDEMPOTENCY_TTL", "limits.idempotency_ttl",
        "seconds an Idempotency-Key is remembered", gt=0)
    idempotency_stale_after: Float = setting(60.0, "NOTIFYD_IDEMPOTENCY_STALE_AFTER",
        "limits.idempotency_stale_after",
        "seconds after which an unfinished Idempotency-Key claim is abandoned", gt=0)
    # --- delivery
    sweep_interval: Float = setting(10.0, "NOTIFYD_SWEEP_INTERVAL", "delivery.sweep_interval",
        "seconds between housekeeping sweeps", gt=0)
    stream_stats_interval: Float = setting(15.0, "NOTIFYD_STREAM_STATS_INTERVAL",
        "delivery.stream_stats_interval",
        "seconds between measures of stream length, pending and lag for /metrics", gt=0)
    public_url: HttpUrl = setting("", "NOTIFYD_PUBLIC_URL", "delivery.public_url",
        "how providers reach us (Twilio status callbacks)")
    preferences_url: UrlTemplate = setting("", "NOTIFYD_PREFERENCES_URL",
        "delivery.preferences_url",
        "e.g. https://app/prefs?u={user_id}; List-Unsubscribe when one-click is off")
    unsubscribe_secret: UnsubscribeSecret = setting("", "NOTIFYD_UNSUBSCRIBE_SECRET",
        "delivery.unsubscribe_secret",
        "signs one-click unsubscribe links (a key derived from it); with NOTIFYD_PUBLIC_URL "
        "turns RFC 8058 List-Unsubscribe on", secret=True)
    unsubscribe_rate: Float = setting(2.0, "NOTIFYD_UNSUBSCRIBE_RATE", "delivery.unsubscribe_rate",
        "/unsubscribe/ requests a second (per client IP, or all together)", ge=0,
        note=UNLIMITED)
    unsubscribe_burst: Int = setting(20, "NOTIFYD_UNSUBSCRIBE_BURST",
        "delivery.unsubscribe_burst", "/unsubscribe/ requests at once", ge=1)
    bounce_domain: Str = setting("", "NOTIFYD_BOUNCE_DOMAIN", "delivery.bounce_domain",
        "mail domain of VERP return paths (bounce+<id>@it); its MX or the relay forwards to the "
        "bounce listener; empty: the From address is the return path")
    bounce_smtp_host: Str = setting("127.0.0.1", "NOTIFYD_BOUNCE_SMTP_HOST",
        "delivery.bounce_smtp_host", "address the bounce listener binds")
    bounce_smtp_port: Int = setting(0, "NOTIFYD_BOUNCE_SMTP_PORT", "delivery.bounce_smtp_port",
        "port of the bounce listener (DSNs and ARF complaints); 0: no listener", ge=0, le=65535)
    bounce_max_bytes: Int = setting(1_048_576, "NOTIFYD_BOUNCE_MAX_BYTES",
        "delivery.bounce_max_bytes", "largest bounce or complaint message accepted (552 past it)",
        ge=4096)
    unsubscribe_rate_scope: RateScope = setting("ip", "NOTIFYD_UNSUBSCRIBE_RATE_SCOPE",
        "delivery.unsubscribe_rate_scope",
        "ip: a bucket per client address (NOTIFYD_TRUSTED_PROXIES), global: one for all")
    default_region: Region = setting("US", "NOTIFYD_DEFAULT_REGION", "delivery.default_region",
        "reads national phone numbers (tenants may override)")
    default_locale: Str = setting("en", "NOTIFYD_DEFAULT_LOCALE", "delivery.default_locale",
        "templates fall back to it")
    tenant_secret_key: Str = setting("", "NOTIFYD_TENANT_SECRET_KEY", "delivery.tenant_secret_key",
        "encrypts tenants' SMTP/Twilio secrets", secret=True)
    send_max_attempts: Int = setting(5, "NOTIFYD_SEND_MAX_ATTEMPTS", "delivery.max_attempts",
        "tries before a delivery is failed", gt=0)
    retry_base: Float = setting(2.0, "NOTIFYD_RETRY_BASE", "delivery.retry_base",
        "first retry delay, seconds, doubling each attempt...", gt=0)
    retry_cap: Float = setting(300.0, "NOTIFYD_RETRY_CAP", "delivery.retry_cap",
        "...up to this (Retry-After from a provider wins)", gt=0)
    send_timeout: Float = setting(10.0, "NOTIFYD_SEND_TIMEOUT", "delivery.send_timeout",
        "seconds one provider call may take (below shutdown_timeout and claim_idle)", gt=0)
    claim_idle: Float = setting(60.0, "NOTIFYD_CLAIM_IDLE", "delivery.claim_idle",
        "seconds work may idle before it is taken over from a dead peer", gt=0)
    reminder_late_after: Float = setting(60.0, "NOTIFYD_REMINDER_LATE_AFTER",
        "delivery.reminder_late_after",
        "a reminder firing later than this, seconds, is flagged late", gt=0)
    reminder_lookahead: Float = setting(0.3, "NOTIFYD_REMINDER_LOOKAHEAD",
        "delivery.reminder_lookahead",
        "seconds ahead reminders and workflow steps are read and planned, then fired on time "
        "(below claim_idle)", ge=0,
        le=MAX_REMINDER_LOOKAHEAD, note="one read early waits that long in its firer")
    stream_max_len: Int = setting(1_000_000, "NOTIFYD_STREAM_MAX_LEN", "delivery.stream_max_len",
        "streams are trimmed (approximately) past this", gt=0)
    stream_block: Float = setting(1.0, "NOTIFYD_STREAM_BLOCK", "delivery.stream_block",
        "longest blocking read, seconds; also bounds how long actors take to stop", gt=0)
    requeue_after: Float = setting(30.0, "NOTIFYD_REQUEUE_AFTER", "delivery.requeue_after",
        "rows stuck this long, seconds, are re-enqueued from PostgreSQL", gt=0)
    email_concurrency: Int = setting(32, "NOTIFYD_EMAIL_CONCURRENCY", "delivery.email_concurrency",
        "emails in flight per instance (more than SMTP connections: claims and records overlap "
        "the round trips)", gt=0)
    sms_concurrency: Int = setting(8, "NOTIFYD_SMS_CONCURRENCY", "delivery.sms_concurrency",
        "SMS in flight per instance", gt=0)
    inapp_concurrency: Int = setting(32, "NOTIFYD_INAPP_CONCURRENCY", "delivery.inapp_concurrency",
        "in-app deliveries (retries) in flight per instance", gt=0)
    smtp_connections_per_tenant: Int = setting(2, "NOTIFYD_SMTP_CONNECTIONS_PER_TENANT",
        "delivery.smtp_connections_per_tenant", "reused SMTP connections per relay", gt=0)
    smtp_connect_timeout: Float = setting(5.0, "NOTIFYD_SMTP_CONNECT_TIMEOUT",
        "delivery.smtp_connect_timeout",
        "TCP connect, TLS and the relay's greeting, seconds (send_timeout bounds it too)", gt=0)
    tenant_send_concurrency: Int = setting(4, "NOTIFYD_TENANT_SEND_CONCURRENCY",
        "delivery.tenant_send_concurrency", "one tenant's sends in flight per channel and instance",
        gt=0)
    tenant_send_queue: Int = setting(128, "NOTIFYD_TENANT_SEND_QUEUE", "delivery.tenant_send_queue",
        "one tenant's entries waiting in memory for a slot; more are parked on the timer wheel",
        ge=0)
    tenant_park_delay: Float = setting(0.5, "NOTIFYD_TENANT_PARK_DELAY",
        "delivery.tenant_park_delay",
        "shortest park of an entry whose tenant is at its cap, seconds", gt=0)
    breaker_failures: Int = setting(5, "NOTIFYD_BREAKER_FAILURES", "delivery.breaker_failures",
        "consecutive failures to reach a relay (or Twilio account) that open its circuit", gt=0)
    breaker_cooldown: Float = setting(30.0, "NOTIFYD_BREAKER_COOLDOWN", "delivery.breaker_cooldown",
        "seconds an open circuit parks its mail, then lets one probe through", gt=0)
    alert_interval: Float = setting(300.0, "NOTIFYD_ALERT_INTERVAL", "delivery.alert_interval",
        "seconds; at most one operator alert email per kind per interval", gt=0)
    # --- egress: tenants' own SMTP relays (notifyd/egress.py, docs/limits.md)
    egress_allowed_networks: Networks = setting((), "NOTIFYD_EGRESS_ALLOWED_NETWORKS",
        "egress.allowed_networks", "loopback/private/special networks a tenant relay may still be "
        "in, e.g. 10.0.5.25/32; any port there")
    egress_allowed_ports: Ports = setting(EGRESS_DEFAULT_PORTS, "NOTIFYD_EGRESS_ALLOWED_PORTS",
        "egress.allowed_ports", "ports of a tenant relay at a public address (\"any\": every port)")
    egress_resolve_timeout: Float = setting(3.0, "NOTIFYD_EGRESS_RESOLVE_TIMEOUT",
        "egress.resolve_timeout", "seconds a tenant relay's DNS lookup may take", gt=0)
    egress_resolve_threads: Int = setting(4, "NOTIFYD_EGRESS_RESOLVE_THREADS",
        "egress.resolve_threads", "threads for those lookups (apart from the rest of the daemon's)",
        gt=0)
    # --- webhooks: tenants' own endpoints (notifyd/webhooks.py, docs/limits.md "Webhooks")
    webhook_allow_http: Bool = setting(False, "NOTIFYD_WEBHOOK_ALLOW_HTTP",
        "webhooks.allow_http", "accept http:// endpoint URLs (else https:// only; dev and tests)")
    webhook_allowed_ports: Ports = setting(WEBHOOK_DEFAULT_PORTS, "NOTIFYD_WEBHOOK_ALLOWED_PORTS",
        "webhooks.allowed_ports",
        "ports of an endpoint at a public address (\"any\": every port); the egress policy's "
        "networks apply as for relays")
    webhook_endpoints_per_tenant: Int = setting(20, "NOTIFYD_WEBHOOK_ENDPOINTS_PER_TENANT",
        "webhooks.endpoints_per_tenant", "webhook endpoints one tenant may have", gt=0)
    webhook_concurrency: Int = setting(64, "NOTIFYD_WEBHOOK_CONCURRENCY", "webhooks.concurrency",
        "webhook requests in flight per instance", gt=0)
    webhook_tenant_concurrency: Int = setting(4, "NOTIFYD_WEBHOOK_TENANT_CONCURRENCY",
        "webhooks.tenant_concurrency",
        "one tenant's webhook requests in flight per instance (its slow endpoint waits on its own "
        "slots only)", gt=0)
    webhook_connect_timeout: Float = setting(5.0, "NOTIFYD_WEBHOOK_CONNECT_TIMEOUT",
        "webhooks.connect_timeout", "seconds to connect (and TLS) to an endpoint", gt=0)
    webhook_timeout: Float = setting(15.0, "NOTIFYD_WEBHOOK_TIMEOUT", "webhooks.timeout",
        "seconds one attempt may take in all; a 2xx within it is a success", gt=0)
    webhook_response_max_bytes: Int = setting(4096, "NOTIFYD_WEBHOOK_RESPONSE_MAX_BYTES",
        "webhooks.response_max_bytes", "bytes of an endpoint's answer read at most (the rest is "
        "dropped with the connection)", ge=0)
    webhook_retry_for: Float = setting(86_400.0, "NOTIFYD_WEBHOOK_RETRY_FOR",
        "webhooks.retry_for", "seconds a delivery is retried before it fails, and an endpoint "
        "may fail every attempt before it is disabled (a day)", gt=0)
    webhook_retry_base: Float = setting(5.0, "NOTIFYD_WEBHOOK_RETRY_BASE", "webhooks.retry_base",
        "seconds before the first retry; doubled each attempt...", gt=0)
    webhook_retry_cap: Float = setting(7200.0, "NOTIFYD_WEBHOOK_RETRY_CAP", "webhooks.retry_cap",
        "...up to this many seconds between attempts", gt=0)
    webhook_secret_overlap: Float = setting(86_400.0, "NOTIFYD_WEBHOOK_SECRET_OVERLAP",
        "webhooks.secret_overlap",
        "seconds the secret before a rotation still signs (beside the new one)", ge=0)
    # --- tenant_config: tenants' SMTP, Twilio and templates from the team's auth service
    tenant_config_url: TenantConfigUrl = setting("", "NOTIFYD_TENANT_CONFIG_URL",
        "tenant_config.url", "http(s) URL with {tenant_id} answering a tenant's configuration "
        "document (empty: off)")
    tenant_config_token: Str = setting("", "NOTIFYD_TENANT_CONFIG_TOKEN", "tenant_config.token",
        "bearer token sent to that URL (empty, with JWT_SECRET: a 60 s JWT notifyd signs per "
        "fetch)", secret=True)
    tenant_config_ttl: Float = setting(60.0, "NOTIFYD_TENANT_CONFIG_TTL", "tenant_config.ttl",
        "seconds a fetched document is used; refreshed in the background before", gt=0)
    tenant_config_connect_timeout: Float = setting(2.0, "NOTIFYD_TENANT_CONFIG_CONNECT_TIMEOUT",
        "tenant_config.connect_timeout", "seconds to connect to the source", gt=0)
    tenant_config_timeout: Float = setting(5.0, "NOTIFYD_TENANT_CONFIG_TIMEOUT",
        "tenant_config.timeout", "seconds one whole fetch may take", gt=0)
    tenant_config_max_bytes: Int = setting(1_048_576, "NOTIFYD_TENANT_CONFIG_MAX_BYTES",
        "tenant_config.max_bytes", "largest document read (bytes); a larger one is refused",
        ge=1024)
    # --- events: domain events from other services (Redis stream, RabbitMQ, Kafka)
    events_enabled: Bool = setting(True, "NOTIFYD_EVENTS_ENABLED", "events.enabled",
        "ingest events at all (the Redis stream <prefix>:events, and RabbitMQ/Kafka when set)")
    event_concurrency: Int = setting(8, "NOTIFYD_EVENT_CONCURRENCY", "events.concurrency",
        "stream events handled at once per instance", gt=0)
    event_max_recipients: Int = setting(100, "NOTIFYD_EVENT_MAX_RECIPIENTS",
        "events.max_recipients", "recipients one event may name", gt=0)
    event_dedupe_ttl: Float = setting(2_592_000.0, "NOTIFYD_EVENT_DEDUPE_TTL", "events.dedupe_ttl",
        "seconds an event id is remembered (30 days; its retention); after that a replay is a new "
        "event", ge=0, note=FOREVER)
    event_max_deliveries: Int = setting(20, "NOTIFYD_EVENT_MAX_DELIVERIES", "events.max_deliveries",
        "tries of an event that keeps failing (not malformed) before it is dead-lettered", gt=0)
    rabbitmq_url: AmqpUrl = setting("", "NOTIFYD_RABBITMQ_URL", "events.rabbitmq_url",
        "amqp://user:pass@host:5672/vhost; empty: no RabbitMQ", secret=True)
    rabbitmq_queue: QueueName = setting("notifyd.events", "NOTIFYD_RABBITMQ_QUEUE",
        "events.rabbitmq_queue", "durable queue consumed (declared if missing)")
    rabbitmq_prefetch: Int = setting(16, "NOTIFYD_RABBITMQ_PREFETCH", "events.rabbitmq_prefetch",
        "unacknowledged messages in flight per instance", ge=1, le=65535,
        note="AMQP's prefetch-count is 16 bits")
    # open by default, as before (notifyd.ingest.binding says why)
    events_tenants: Tenants = setting(("*",), "NOTIFYD_EVENTS_TENANTS", "events.tenants",
        "tenants the Redis stream may publish for (\"*\": all; list them to close it; "
        "docs/limits.md)")
    events_allow_critical: Bool = setting(True, "NOTIFYD_EVENTS_ALLOW_CRITICAL",
        "events.allow_critical", "whether its events may be critical (else dead-lettered)")
    rabbitmq_tenants: Tenants = setting(("*",), "NOTIFYD_RABBITMQ_TENANTS",
        "events.rabbitmq_tenants", "tenants the RabbitMQ queue may publish for (\"*\": all)")
    rabbitmq_allow_critical: Bool = setting(True, "NOTIFYD_RABBITMQ_ALLOW_CRITICAL",
        "events.rabbitmq_allow_critical", "whether its events may be critical (else dead-lettered)")
    rabbitmq_user_tenants: UserTenants = setting(None, "NOTIFYD_RABBITMQ_USER_TENANTS",
        "events.rabbitmq_user_tenants", "per broker user (the AMQP user_id the broker checks; "
        "then required) the tenants it may publish for (env: svc-a=TEN-1,TEN-2;svc-b=*); empty: "
        "any user", factory=dict)
    # Kafka (notifyd/ingest/kafka_source.py; docs/deploy.md "Kafka")
    kafka_bootstrap_servers: KafkaServers = setting((), ("KAFKA_BROKER",
        "NOTIFYD_KAFKA_BOOTSTRAP_SERVERS"), "events.kafka_bootstrap_servers",
        "host:port of Kafka brokers, comma-separated; empty: no Kafka")
    kafka_topics: KafkaTopics = setting(("notifyd.events",), "NOTIFYD_KAFKA_TOPICS",
        "events.kafka_topics", "topics whose events are consumed (empty: none, e.g. to publish "
        "delivery events only)")
    kafka_group: KafkaGroup = setting("notifyd-ingest", "NOTIFYD_KAFKA_GROUP",
        "events.kafka_group", "consumer group: instances in one group share the partitions")
    kafka_max_batch: Int = setting(100, "NOTIFYD_KAFKA_MAX_BATCH", "events.kafka_max_batch",
        "records fetched at once per instance (each partition in order)", ge=1, le=10_000)
    kafka_security_protocol: KafkaProtocol = setting("PLAINTEXT",
        "NOTIFYD_KAFKA_SECURITY_PROTOCOL", "events.kafka_security_protocol",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    kafka_ssl_cafile: KeyFile = setting("", "NOTIFYD_KAFKA_SSL_CAFILE", "events.kafka_ssl_cafile",
        "CA bundle (PEM) for SSL/SASL_SSL; empty: the system's")
    kafka_ssl_certfile: KeyFile = setting("", "NOTIFYD_KAFKA_SSL_CERTFILE",
        "events.kafka_ssl_certfile", "client certificate (PEM) for mutual TLS")
    kafka_ssl_keyfile: KeyFile = setting("", "NOTIFYD_KAFKA_SSL_KEYFILE",
        "events.kafka_ssl_keyfile", "its private key (PEM)")
    kafka_sasl_mechanism: KafkaSasl = setting("", "NOTIFYD_KAFKA_SASL_MECHANISM",
        "events.kafka_sasl_mechanism", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_* protocols)")
    kafka_sasl_username: Str = setting("", "NOTIFYD_KAFKA_SASL_USERNAME",
        "events.kafka_sasl_username", "SASL user")
    kafka_sasl_password: Str = setting("", "NOTIFYD_KAFKA_SASL_PASSWORD",
        "events.kafka_sasl_password", "SASL password", secret=True)
    kafka_events_topic: KafkaTopic = setting("", "NOTIFYD_KAFKA_EVENTS_TOPIC",
        "events.kafka_events_topic", "topic that notification status changes are published to, "
        "keyed by tenant (a durable outbox; at least once); empty: none")
    kafka_tenants: Tenants = setting(("*",), "NOTIFYD_KAFKA_TENANTS", "events.kafka_tenants",
        "tenants the Kafka topics may publish for (\"*\": all)")
    kafka_allow_critical: Bool = setting(True, "NOTIFYD_KAFKA_ALLOW_CRITICAL",
        "events.kafka_allow_critical", "whether its events may be critical (else dead-lettered)")
    # --- actors: supervision of the background actors
    actor_backoff_cap: Float = setting(30.0, "NOTIFYD_ACTOR_BACKOFF_CAP", "actors.backoff_cap",
        "longest wait before restarting a crashed actor, seconds", gt=0)
    actor_max_restarts: Int = setting(20, "NOTIFYD_ACTOR_MAX_RESTARTS", "actors.max_restarts",
        "crashes allowed within the window...", gt=0)
    actor_restart_window: Float = setting(60.0, "NOTIFYD_ACTOR_RESTART_WINDOW",
        "actors.restart_window", "...past which notifyd exits 1 for systemd, seconds", gt=0)
    # --- realtime: WebSockets
    # one list for the sockets' Origin check and CORS on /ui/ and the REST routes the web
    # components use; NOTIFYD_WS_ALLOWED_ORIGINS is its older name (sockets only, then)
    allowed_origins: Strs = setting((), ("NOTIFYD_ALLOWED_ORIGINS", "NOTIFYD_WS_ALLOWED_ORIGINS"),
        "realtime.allowed_origins",
        "browser Origins (scheme://host[:port]) allowed: WebSocket Origin check and CORS "
        "(empty: same host only, no CORS)")
    ws_heartbeat: Float = setting(20.0, "NOTIFYD_WS_HEARTBEAT", "realtime.heartbeat",
        "ping interval, seconds; a socket that does not answer is closed", gt=0)
    ws_max_frame: Int = setting(65536, "NOTIFYD_WS_MAX_FRAME", "realtime.max_frame",
        "largest frame a client may send, bytes", gt=0)
    ws_history_len: Int = setting(1000, "NOTIFYD_WS_HISTORY_LEN", "realtime.history_len",
        "live events kept per user for ?since= replay", gt=0)
    # one day covers a blip, a deploy or a night's sleep, and bounds how long made-up ids last
    ws_history_ttl: Float = setting(86_400.0, "NOTIFYD_WS_HISTORY_TTL", "realtime.history_ttl",
        "seconds a feed's history is kept after its last event (a client back later gets a gap)",
        gt=0)
    ws_replay_max_entries: Int = setting(200, "NOTIFYD_WS_REPLAY_MAX_ENTRIES",
        "realtime.replay_max_entries",
        "events one ?since= replay sends at most (the newest; a gap for the rest)", gt=0)
    ws_replay_max_bytes: Int = setting(262_144, "NOTIFYD_WS_REPLAY_MAX_BYTES",
        "realtime.replay_max_bytes", "bytes of events one replay sends at most", gt=0)
    ws_send_queue: Int = setting(256, "NOTIFYD_WS_SEND_QUEUE", "realtime.send_queue",
        "events queued per socket before a slow client is dropped", gt=0)
    ws_send_buffer: Int = setting(1_048_576, "NOTIFYD_WS_SEND_BUFFER", "realtime.send_buffer",
        "bytes waiting for a socket's client before it is dropped", gt=0)
    ws_message_rate: Float = setting(10.0, "NOTIFYD_WS_MESSAGE_RATE", "realtime.message_rate",
        "frames a second a client may send (sustained)...", gt=0)
    ws_message_burst: Int = setting(20, "NOTIFYD_WS_MESSAGE_BURST", "realtime.message_burst",
        "...and in a burst; more are refused with an error frame", gt=0)
    ws_presence_ttl: Float = setting(30.0, "NOTIFYD_WS_PRESENCE_TTL", "realtime.presence_ttl",
        "seconds after which a crashed instance's users show as left", gt=0)
    ws_token_warning: Float = setting(30.0, "NOTIFYD_WS_TOKEN_WARNING", "realtime.token_warning",
        "seconds before its token's close a socket gets `token_expiring`", ge=0,
        note="0: no warning")
    # under a burst batches fill up, and fewer larger ones cost less per message everywhere
    chat_write_batch: Int = setting(256, "NOTIFYD_CHAT_WRITE_BATCH", "realtime.chat_write_batch",
        "most chat messages stored and published in one go", gt=0)
    room_max_members: Int = setting(1000, "NOTIFYD_ROOM_MAX_MEMBERS", "realtime.room_max_members",
        "members a group chat room may have", gt=0)
    # --- retention: rows in a final state, deleted by the housekeeper (docs/limits.md)
    retain_notifications: Float = setting(7_776_000.0, "NOTIFYD_RETAIN_NOTIFICATIONS",
        "retention.notifications", "seconds a sent/failed/... notification is kept (90 days)", ge=0,
        note=FOREVER)
    retain_messages: Float = setting(31_536_000.0, "NOTIFYD_RETAIN_MESSAGES", "retention.messages",
        "seconds a chat message is kept (365 days)", ge=0, note=FOREVER)
    retain_reminders: Float = setting(7_776_000.0, "NOTIFYD_RETAIN_REMINDERS",
        "retention.reminders",
        "seconds a fired/skipped/cancelled reminder is kept after its interview (90 days)", ge=0,
        note=FOREVER)
    retain_workflow_runs: Float = setting(7_776_000.0, "NOTIFYD_RETAIN_WORKFLOW_RUNS",
        "retention.workflow_runs",
        "seconds a finished workflow run (no step pending) and its steps are kept after the "
        "trigger (90 days)", ge=0, note=FOREVER)
    retain_audit: Float = setting(31_536_000.0, "NOTIFYD_RETAIN_AUDIT", "retention.audit",
        "seconds an audit row is kept (365 days; compliance may require longer)", ge=0,
        note=FOREVER)
    retain_webhook_deliveries: Float = setting(2_592_000.0, "NOTIFYD_RETAIN_WEBHOOK_DELIVERIES",
        "retention.webhook_deliveries",
        "seconds a succeeded or failed webhook delivery (its data and attempts) is kept (30 days)",
        ge=0, note=FOREVER)
    retain_batch: Int = setting(1000, "NOTIFYD_RETAIN_BATCH", "retention.batch",
        "rows one DELETE removes at most", gt=0, le=10_000,
        note="a larger batch holds its row locks and its WAL burst long enough to slow the "
        "request path")
    retain_pause: Float = setting(0.1, "NOTIFYD_RETAIN_PAUSE", "retention.pause",
        "seconds between two DELETEs of the purge", ge=0)
    # --- quotas: rates, daily quotas, socket caps (docs/limits.md); per-tenant overrides with
    # `notifyd limits set`
    rate_user: Float = setting(5.0, "NOTIFYD_RATE_USER", "quotas.rate_user", "sends a second per "
        "`user` token (REST sends, messages, rooms, reminders), every instance together", ge=0,
        note=UNLIMITED)
    rate_user_burst: Int = setting(20, "NOTIFYD_RATE_USER_BURST", "quotas.rate_user_burst",
        "sends a `user` token may make at once", ge=1)
    rate_service: Float = setting(0.0, "NOTIFYD_RATE_SERVICE", "quotas.rate_service",
        "sends a second per `service` or `admin` token", ge=0, note=UNLIMITED)
    rate_service_burst: Int = setting(1000, "NOTIFYD_RATE_SERVICE_BURST",
        "quotas.rate_service_burst", "sends such a token may make at once", ge=1)
    rate_tenant: Float = setting(20_000.0, "NOTIFYD_RATE_TENANT", "quotas.rate_tenant",
        "sends a second of every caller of one tenant together", ge=0, note=UNLIMITED)
    rate_tenant_burst: Int = setting(40_000, "NOTIFYD_RATE_TENANT_BURST",
        "quotas.rate_tenant_burst", "sends one tenant may make at once", ge=1)
    quota_email_daily: Int = setting(50_000, "NOTIFYD_QUOTA_EMAIL_DAILY", "quotas.email_daily",
        "emails per tenant and UTC day through the global EMAIL_* relay (a tenant's own relay: no "
        "quota)", ge=0, note=UNLIMITED)
    quota_sms_daily: Int = setting(5000, "NOTIFYD_QUOTA_SMS_DAILY", "quotas.sms_daily",
        "SMS per tenant and UTC day through the platform's TWILIO_* account", ge=0, note=UNLIMITED)
    ws_max_per_user: Int = setting(20, "NOTIFYD_WS_MAX_PER_USER", "quotas.sockets_per_user",
        "open WebSockets of one user, every instance together (the next is closed with 4029)", ge=0,
        note=UNLIMITED)
    ws_max_per_tenant: Int = setting(20_000, "NOTIFYD_WS_MAX_PER_TENANT",
        "quotas.sockets_per_tenant", "open WebSockets of one tenant", ge=0, note=UNLIMITED)
    limits_refresh: Float = setting(10.0, "NOTIFYD_LIMITS_REFRESH", "quotas.refresh",
        "seconds before an operator's per-tenant override applies on every instance", gt=0)

    # fmt: on

    @property
    def notices(self) -> tuple[str, ...]:
        """What the loader read but no longer uses (retired settings), for check-config; set
        by the loader outside the fields, so it takes no part in equality."""
        notices: tuple[str, ...] = self.__dict__.get("_notices", ())
        return notices

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

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Self:
        """Rules across settings: what a running daemon would otherwise discover too late.
        Raises `SettingsError` (not a pydantic error: each problem names its settings)."""
        failed = None if info.context is None else info.context["failed"]
        problems = cross_field_problems(self, failed=failed)
        if problems:
            raise SettingsError(problems)
        return self


def cross_field_problems(s: Settings, *, failed: frozenset[str] | None) -> list[str]:
    """Each rule that involves two settings or more, named by their environment names.
    `failed`: from the loader, the settings already reported (their defaults stand in); the
    daemon it starts needs a signing key, settings built in code (tests: None) need none."""
    problems: list[str] = []
    if s.db_pool_max < s.db_pool_min:
        problems.append("NOTIFYD_DB_POOL_MIN/MAX: need 1 <= min <= max")
    keys = bool(s.jwt_public_key_file or s.jwt_jwks_url)
    key_names = {"jwt_secret", "jwt_public_key_file", "jwt_jwks_url"}
    if failed is not None and not (s.jwt_secret or keys or key_names & failed):
        problems.append(
            "JWT_SECRET: missing; set it (HS256), "
            "or JWT_PUBLIC_KEY_FILE / JWT_JWKS_URL (RS256/ES256)"
        )
    for alg in s.effective_jwt_algorithms:
        if not re.fullmatch(r"(HS|RS|PS|ES)(256|384|512)|EdDSA", alg):
            problems.append(f"JWT_ALGORITHMS: {alg!r} is not an accepted signing algorithm")
        elif alg.startswith("HS") and not s.jwt_secret:
            problems.append(f"JWT_ALGORITHMS: {alg} needs JWT_SECRET")
        elif not alg.startswith("HS") and not keys:
            problems.append(f"JWT_ALGORITHMS: {alg} needs JWT_PUBLIC_KEY_FILE or JWT_JWKS_URL")
    if s.email_use_tls and s.email_use_ssl:
        problems.append("EMAIL_USE_TLS/EMAIL_USE_SSL: choose one (STARTTLS or implicit TLS)")
    if s.reminder_lookahead >= s.claim_idle:
        problems.append(
            "NOTIFYD_REMINDER_LOOKAHEAD: must be shorter than NOTIFYD_CLAIM_IDLE, or a reminder "
            "waiting for its time is taken over as if its reader had died"
        )
    if s.redis_timeout < s.stream_block + 1:
        problems.append(
            "NOTIFYD_REDIS_TIMEOUT: must be at least NOTIFYD_STREAM_BLOCK + 1 s, or every "
            "stream read that waits its whole block time would count as a hung Redis"
        )
    if s.send_timeout >= s.shutdown_timeout:
        problems.append(
            "NOTIFYD_SEND_TIMEOUT: must be shorter than NOTIFYD_SHUTDOWN_TIMEOUT, so a send in "
            "flight at SIGTERM can finish instead of being cut off"
        )
    if s.send_timeout >= s.claim_idle:
        problems.append(
            "NOTIFYD_SEND_TIMEOUT: must be shorter than NOTIFYD_CLAIM_IDLE, or a slow send "
            "would be taken over by another instance while still running"
        )
    if s.kafka_bootstrap_servers:
        sasl = s.kafka_security_protocol.startswith("SASL_")
        if sasl and not (s.kafka_sasl_mechanism and s.kafka_sasl_username):
            problems.append(
                "NOTIFYD_KAFKA_SECURITY_PROTOCOL: SASL_* needs NOTIFYD_KAFKA_SASL_MECHANISM and "
                "NOTIFYD_KAFKA_SASL_USERNAME (and its password)"
            )
        if not sasl and s.kafka_sasl_mechanism:
            problems.append(
                "NOTIFYD_KAFKA_SASL_MECHANISM: set, but NOTIFYD_KAFKA_SECURITY_PROTOCOL is not "
                "SASL_PLAINTEXT or SASL_SSL, so it would be ignored"
            )
        if s.kafka_events_topic in s.kafka_topics:
            problems.append(
                "NOTIFYD_KAFKA_EVENTS_TOPIC: is also in NOTIFYD_KAFKA_TOPICS; notifyd would "
                "read its own delivery events back as domain events"
            )
        if bool(s.kafka_ssl_certfile) != bool(s.kafka_ssl_keyfile):
            problems.append("NOTIFYD_KAFKA_SSL_CERTFILE/KEYFILE: set both or neither")
    elif s.kafka_events_topic:
        problems.append("NOTIFYD_KAFKA_EVENTS_TOPIC: needs KAFKA_BROKER (the brokers to use)")
    if s.page_size_default > s.page_size_max:
        problems.append("NOTIFYD_PAGE_SIZE_DEFAULT: must not exceed NOTIFYD_PAGE_SIZE_MAX")
    return problems
