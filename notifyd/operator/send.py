"""`notifyd send`: one notification from the shell, for smoke tests.

It takes the REST route's path, not a shortcut (`notifyd.accept`): the same checks and
rendering, the row and its audit row in one statement, then the intent on the stream. A
smoke test that gets delivered therefore proves the path a client's POST takes. Two
differences, on purpose: there is no token and no role policy (whoever holds the database
credentials is trusted already), and the audit row says `"via": "cli"`, with the operating
system user and host that ran it.

Redis is checked before anything is written: a smoke test against a broken Redis should fail
loudly, not leave a row for the sweeper. With NOTIFYD_TENANT_CONFIG_URL set, the tenant's
document is fetched once (no cache: a command runs once) and laid over the stored settings as
the daemon lays it, so a template or region only the auth service has is found; a source
that cannot give it is an error, and nothing is stored, as a REST send answers 503.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from notifyd.accept.orders import Order, Refused, order_problems
from notifyd.accept.outbox import announce
from notifyd.accept.prepare import prepare
from notifyd.accept.rows import authored
from notifyd.egress import Egress
from notifyd.ids import OpaqueIdRule
from notifyd.keys import Keys
from notifyd.operator import connect
from notifyd.operator.audit import cli_author
from notifyd.operator.output import print_json
from notifyd.payloads import loads
from notifyd.schemas.registry import Schemas
from notifyd.settings import Settings
from notifyd.store.notifications import insert_many_audited
from notifyd.store.tenants import TenantSettings, load_redacted, overlay
from notifyd.streams.producer import Producer
from notifyd.tenant_config import Refused as SourceRefused
from notifyd.tenant_config import Source, Unreachable

# The REST body's field names, as this command spells them.
_FLAGS = {
    "notification_type": "--channel",
    "recipient": "--recipient",
    "user_id": "--to",
    "subject": "--subject",
    "message": "--message",
    "template_key": "--template-key",
    "context": "--context",
    "category": "--category",
    "locale": "--locale",
    "tenant_id": "--tenant",
    "actor": "--actor",
}


@dataclass(frozen=True, slots=True)
class SendOptions:
    tenant: str
    to: str
    channel: str
    recipient: str | None
    subject: str | None
    message: str | None
    template_key: str | None
    context: str | None  # JSON text, as typed
    category: str | None
    locale: str | None
    critical: bool
    actor: str


def _flag(field: str, channel: str) -> str:
    if field == "recipient" and channel == "in_app":
        return "--to"  # an in-app notification's recipient is the user
    return _FLAGS.get(field, field)


def build_order(
    options: SendOptions, settings: Settings, id_rule: OpaqueIdRule
) -> tuple[Order | None, list[str]]:
    """The order the options describe, or every problem with them (`--flag: why`)."""
    found: list[str] = []
    for flag, value in (("--tenant", options.tenant), ("--actor", options.actor)):
        problem = id_rule.problem(value)
        if problem is not None:
            found.append(f"{flag}: {problem}")
    context: dict[str, Any] | None = None
    if options.context is not None:
        try:
            parsed = loads(options.context)
        except orjson.JSONDecodeError as exc:
            found.append(f"--context: is not valid JSON ({exc})")
        else:
            if isinstance(parsed, dict):
                context = parsed
            else:
                found.append("--context: must be a JSON object")
    in_app = options.channel == "in_app"
    if in_app and options.recipient is not None and options.recipient != options.to:
        found.append("--recipient: an in-app notification goes to the user named by --to")
    recipient = options.to if in_app else options.recipient
    if recipient is None:
        found.append(
            f"--recipient: is required for {options.channel} (the email address or phone number)"
        )
    order = Order(
        channel=options.channel,
        recipient=recipient or "",
        subject=options.subject,
        message=options.message,
        template_key=options.template_key,
        context=context,
        user_id=None if in_app else options.to,
        category=options.category,
        critical=options.critical,
        locale=options.locale,
    )
    for refusal in order_problems(order, Schemas.build(settings).send):
        if refusal.field == "recipient" and recipient is None:
            continue  # said above, in this command's words
        if refusal.field == "context" and options.context is not None and context is None:
            continue  # the JSON itself is at fault, said above
        found.append(f"{_flag(refusal.field, options.channel)}: {refusal.message}")
    return (None, found) if found else (order, [])


def _refused(problems: list[str]) -> int:
    for problem in problems:
        print(f"notifyd send: {problem}", file=sys.stderr)
    print("notifyd send: nothing was stored", file=sys.stderr)
    return connect.REFUSED


async def with_source(settings: Settings, tenant_id: str, stored: TenantSettings) -> TenantSettings:
    """The tenant's settings as the daemon sees them: the configuration source's document
    (fetched now) over the stored ones. Raises the source's `Unreachable` or `Refused`."""
    if not settings.tenant_config_url:
        return stored
    egress = Egress.from_settings(settings)
    try:
        async with aiohttp.ClientSession() as http:
            fetched = await Source(settings, http, egress).fetch(tenant_id, None)
    finally:
        egress.close()
    assert fetched is not None  # no ETag was offered: never "not modified"
    return overlay(stored, fetched.settings)


async def run(settings: Settings, options: SendOptions) -> int:
    rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)
    order, problems = build_order(options, settings, rule)
    if order is None:
        return _refused(problems)
    async with connect.redis(settings) as redis, connect.postgres(settings) as pool:
        # region, locale and templates only: nothing here needs the tenant's secrets
        stored = (await load_redacted(pool, options.tenant)).settings
        try:
            tenant = await with_source(settings, options.tenant, stored)
        except (Unreachable, SourceRefused) as exc:
            print(
                f"notifyd send: the tenant configuration source: {exc}; nothing was stored",
                file=sys.stderr,
            )
            return connect.FAILED
        try:
            prepared = await prepare(pool, settings, tenant, options.tenant, order)
        except Refused as exc:
            return _refused([f"{_flag(p.field, order.channel)}: {p.message}" for p in exc.problems])
        rows, entries = authored([prepared], options.tenant, cli_author(options.actor))
        await insert_many_audited(pool, rows, entries)
        producer = Producer(redis, settings.stream_max_len)
        enqueued = await announce(producer, Keys(settings.redis_prefix), rows)
    print_json({"notification_ids": [str(rows[0].id)], "status": "queued", "enqueued": enqueued})
    if not enqueued:
        print(
            "notifyd send: stored, but Redis failed before the intent was enqueued; the "
            "sweeper enqueues it within NOTIFYD_REQUEUE_AFTER",
            file=sys.stderr,
        )
    return connect.OK
