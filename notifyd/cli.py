"""`notifyd` command line: serve, migrate, token, check-config, settings, and the operator commands
send, dlq, reminders, limits and stats (their logic lives in notifyd/operator/).

Exit codes: 0 done; 1 a server (PostgreSQL, Redis) unreachable or failing, or not everything
asked for could be done; 2 bad settings or bad input, nothing changed."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from notifyd import __version__, logs
from notifyd.limits import LIMIT_NAMES, RATE_NAMES
from notifyd.schemas.reminders import STATUSES as REMINDER_STATUSES
from notifyd.settings import (
    CHANNELS,
    ROLES,
    Settings,
    SettingsError,
    describe,
    example_toml,
    load_settings,
    markdown,
)

# notifyd.http.reminders.STATUSES, not imported here: every command would load aiohttp


def _load(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(config_file=args.config)
    except SettingsError as exc:
        print("notifyd: configuration problems:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print("run `notifyd check-config` for the effective settings", file=sys.stderr)
        raise SystemExit(2) from None


def _run(coro: Coroutine[Any, Any, int]) -> int:
    import uvloop

    return uvloop.run(coro)


def cmd_serve(args: argparse.Namespace) -> int:
    from notifyd.app import serve

    settings = _load(args)
    logs.configure(settings.log_level, settings.log_format, settings.debug)
    for notice in settings.notices:  # retired settings: said once, where the operator looks
        logging.getLogger("notifyd.settings").warning("%s", notice)
    return _run(serve(settings))


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from notifyd.store import migrate

    settings = _load(args)
    logs.configure(settings.log_level, settings.log_format, settings.debug)
    sql_dir = Path(args.sql_dir) if args.sql_dir else migrate.DEFAULT_SQL_DIR

    async def run() -> int:
        try:
            conn = await asyncpg.connect(settings.database_url)
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"notifyd migrate: cannot connect to DATABASE_URL: {exc}", file=sys.stderr)
            return 1
        try:
            applied = await migrate.apply(conn, sql_dir)
        except migrate.MigrationError as exc:
            print(f"notifyd migrate: {exc}", file=sys.stderr)
            return 1
        finally:
            await conn.close()
        if applied:
            print(f"applied: {', '.join(applied)}")
        else:
            print("nothing to apply; the schema is current")
        return 0

    return _run(run())


def cmd_token(args: argparse.Namespace) -> int:
    from notifyd.auth.tokens import mint_token
    from notifyd.ids import OpaqueIdRule

    settings = _load(args)
    rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)
    for name, value in (("--tenant", args.tenant), ("--user", args.user)):
        problem = rule.problem(value)
        if problem:
            print(f"notifyd token: {name} {problem}", file=sys.stderr)
            return 2
    private_key = Path(args.private_key).read_bytes() if args.private_key else None
    try:
        token = mint_token(
            settings,
            tenant_id=args.tenant,
            user_id=args.user,
            role=args.role,
            ttl=args.ttl,
            private_key_pem=private_key,
            algorithm=args.algorithm,
        )
    except ValueError as exc:
        print(f"notifyd token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print a listing generated from the settings' one declaration (no settings are read)."""
    print(markdown() if args.markdown else example_toml(), end="")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(config_file=args.config)
    except SettingsError as exc:
        print("configuration is NOT valid:")
        for problem in exc.problems:
            print(f"  - {problem}")
        return 1
    rows = describe(settings)
    width = max(len(env) for env, _, _ in rows)
    for env, toml_key, shown in rows:
        print(
            f"{env:<{width}}  {shown}    # [{toml_key}]"
            if "." in toml_key
            else f"{env:<{width}}  {shown}    # {toml_key}"
        )
    from notifyd.ingest.binding import open_sources

    for warning in [*settings.notices, *open_sources(settings)]:
        print(f"warning: {warning}")
    print("configuration is valid")
    return 0


def _operator(
    command: str, args: argparse.Namespace, work: Callable[[Settings], Coroutine[Any, Any, int]]
) -> int:
    """An operator command: settings like every command, then its work with unreachable or
    failing servers reported in one line (exit 1)."""
    from notifyd.operator.connect import guarded

    settings = _load(args)
    logs.configure(settings.log_level, settings.log_format, settings.debug)
    return _run(guarded(command, work(settings)))


def cmd_send(args: argparse.Namespace) -> int:
    from notifyd.operator import send

    options = send.SendOptions(
        tenant=args.tenant,
        to=args.to,
        channel=args.channel,
        recipient=args.recipient,
        subject=args.subject,
        message=args.message,
        template_key=args.template_key,
        context=args.context,
        category=args.category,
        locale=args.locale,
        critical=args.critical,
        actor=args.actor,
    )
    return _operator("send", args, lambda settings: send.run(settings, options))


def cmd_dlq_list(args: argparse.Namespace) -> int:
    from notifyd.operator import dlq

    return _operator(
        "dlq list",
        args,
        lambda s: dlq.list_command(s, limit=args.limit or s.page_size_default, as_json=args.json),
    )


def cmd_dlq_requeue(args: argparse.Namespace) -> int:
    from notifyd.operator import dlq
    from notifyd.operator.audit import cli_author

    if bool(args.ids) == args.all:
        print("notifyd dlq requeue: name entry ids, or --all (not both)", file=sys.stderr)
        return 2
    return _operator(
        "dlq requeue",
        args,
        lambda s: dlq.requeue_command(
            s, ids=args.ids, everything=args.all, as_json=args.json, author=cli_author(args.actor)
        ),
    )


def cmd_reminders_list(args: argparse.Namespace) -> int:
    from notifyd.operator import reminders

    return _operator(
        "reminders list",
        args,
        lambda s: reminders.list_command(
            s,
            due_before_text=args.due_before,
            tenant_id=args.tenant,
            status=args.status,
            limit=args.limit or s.page_size_default,
            as_json=args.json,
        ),
    )


def cmd_stats(args: argparse.Namespace) -> int:
    from notifyd.operator import stats

    return _operator("stats", args, lambda s: stats.command(s, as_json=args.json))


def cmd_limits_show(args: argparse.Namespace) -> int:
    from notifyd.operator import limits

    return _operator(
        "limits show",
        args,
        lambda s: limits.show_command(s, tenant_id=args.tenant, as_json=args.json),
    )


def cmd_limits_set(args: argparse.Namespace) -> int:
    from notifyd.operator import limits
    from notifyd.operator.audit import cli_author

    values = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    if not values:
        print("notifyd limits set: name at least one limit, e.g. --rate-user 10", file=sys.stderr)
        return 2
    return _operator(
        "limits set",
        args,
        lambda s: limits.set_command(
            s, tenant_id=args.tenant, values=values, author=cli_author(args.actor)
        ),
    )


def cmd_limits_unset(args: argparse.Namespace) -> int:
    from notifyd.operator import limits
    from notifyd.operator.audit import cli_author

    names = list(LIMIT_NAMES) if args.all else [n for n in LIMIT_NAMES if getattr(args, n)]
    if not names:
        print("notifyd limits unset: name the limits to unset, or --all", file=sys.stderr)
        return 2
    return _operator(
        "limits unset",
        args,
        lambda s: limits.unset_command(
            s, tenant_id=args.tenant, names=names, author=cli_author(args.actor)
        ),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_operator_commands(sub: Any) -> None:
    send = sub.add_parser(
        "send",
        help="send one notification (smoke test), through the same path as the REST route",
        description="Store one notification (row + audit row in one transaction) and enqueue "
        "it, exactly as POST /notifications/send/ does, but without a token or role policy; "
        'the audit row says "via": "cli". Prints {"notification_ids": [...]} as JSON.',
    )
    send.add_argument("--tenant", required=True, help="tenant id")
    send.add_argument(
        "--to", required=True, metavar="USER_ID", help="the user it is for (in-app: the recipient)"
    )
    send.add_argument("--channel", choices=CHANNELS, default="in_app", help="default: in_app")
    send.add_argument(
        "--recipient", metavar="ADDRESS", help="email address or phone number (email and sms)"
    )
    send.add_argument("--subject", help="subject (required for email unless the template has one)")
    send.add_argument("--message", help="text (required unless --template-key is given)")
    send.add_argument("--template-key", metavar="K", help="render the tenant's template K")
    send.add_argument("--context", metavar="JSON", help="template variables, a JSON object")
    send.add_argument("--category", help="category (opt-outs are per category)")
    send.add_argument("--locale", help="template locale, e.g. pt-BR")
    send.add_argument("--critical", action="store_true", help="ignore the user's opt-outs")
    send.add_argument(
        "--actor", default="cli", help="user id recorded as sender and in the audit log (cli)"
    )
    send.set_defaults(func=cmd_send)

    dlq = sub.add_parser(
        "dlq",
        help="list or requeue dead letters",
        description="The dead-letter stream: stream entries a consumer gave up on, and "
        "deliveries that failed for good.",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", help="dead letters, newest first")
    _add_page_limit(dlq_list)
    dlq_list.add_argument("--json", action="store_true", help="one JSON document")
    dlq_list.set_defaults(func=cmd_dlq_list)
    requeue = dlq_sub.add_parser(
        "requeue",
        help="put dead letters back on their stream",
        description="Put each entry back on its original stream and delete it from the dead "
        "stream. A failed delivery is restarted as POST /notifications/{id}/retry/ does "
        "(fresh attempts, audited). Exit 1 when any could not be requeued.",
    )
    requeue.add_argument("ids", nargs="*", metavar="ID", help="dead-letter entry ids (dlq list)")
    requeue.add_argument("--all", action="store_true", help="every dead letter there now")
    requeue.add_argument("--json", action="store_true", help="one JSON document")
    requeue.add_argument("--actor", default="cli", help="user id for the audit log (cli)")
    requeue.set_defaults(func=cmd_dlq_requeue)

    reminders = sub.add_parser("reminders", help="inspect interview reminders")
    reminders_sub = reminders.add_subparsers(dest="reminders_command", required=True)
    due = reminders_sub.add_parser(
        "list",
        help="reminders due before a time, soonest first (from PostgreSQL)",
        description="Reminders whose reminder time is before --due-before, soonest first.",
    )
    due.add_argument(
        "--due-before", required=True, metavar="ISO8601", help="e.g. 2026-03-10T10:00:00Z"
    )
    due.add_argument("--tenant", help="only this tenant (default: every tenant)")
    due.add_argument(
        "--status",
        choices=(*REMINDER_STATUSES, "all"),
        default="scheduled",
        help="default: scheduled",
    )
    _add_page_limit(due)
    due.add_argument("--json", action="store_true", help="one JSON document")
    due.set_defaults(func=cmd_reminders_list)

    _add_limits_commands(sub)

    stats = sub.add_parser(
        "stats",
        help="streams, consumer groups, timer, dead letters, notifications by status",
        description="Stream lengths; per consumer group its consumers, pending entries and "
        "lag; the timer wheel's size and next due time; the dead-letter count; notification "
        "rows by status.",
    )
    stats.add_argument("--json", action="store_true", help="one JSON document")
    stats.set_defaults(func=cmd_stats)


def _add_page_limit(parser: argparse.ArgumentParser) -> None:
    """`--limit N`, the page size of a listing command (as `?limit=` is of a route)."""
    parser.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help="at most N (default: NOTIFYD_PAGE_SIZE_DEFAULT)",
    )


def _add_limits_commands(sub: Any) -> None:
    limits = sub.add_parser(
        "limits",
        help="show or override one tenant's rate limits, daily quotas and socket caps",
        description="Per-tenant overrides of the NOTIFYD_RATE_*, NOTIFYD_QUOTA_* and "
        "NOTIFYD_WS_MAX_* settings (docs/limits.md); 0 means unlimited. Running daemons "
        "apply a change within NOTIFYD_LIMITS_REFRESH seconds. Changes are audited.",
    )
    limits_sub = limits.add_subparsers(dest="limits_command", required=True)
    show = limits_sub.add_parser("show", help="a tenant's limits, and where each comes from")
    show.add_argument("--tenant", required=True, help="tenant id")
    show.add_argument("--json", action="store_true", help="one JSON document")
    show.set_defaults(func=cmd_limits_show)
    change = limits_sub.add_parser("set", help="override some of a tenant's limits")
    change.add_argument("--tenant", required=True, help="tenant id")
    for name in LIMIT_NAMES:
        change.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=float,
            metavar="N",
            help="sends a second" if name in RATE_NAMES else None,
        )
    change.add_argument("--actor", default="cli", help="user id for the audit log (cli)")
    change.set_defaults(func=cmd_limits_set)
    unset = limits_sub.add_parser("unset", help="back to the defaults for some limits")
    unset.add_argument("--tenant", required=True, help="tenant id")
    for name in LIMIT_NAMES:
        unset.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true")
    unset.add_argument("--all", action="store_true", help="every override of the tenant")
    unset.add_argument("--actor", default="cli", help="user id for the audit log (cli)")
    unset.set_defaults(func=cmd_limits_unset)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notifyd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"notifyd {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file (default: $NOTIFYD_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon").set_defaults(func=cmd_serve)
    migrate = sub.add_parser("migrate", help="apply pending SQL migrations")
    migrate.add_argument(
        "--sql-dir", help="migrations folder (default: the sql/ inside the notifyd package)"
    )
    migrate.set_defaults(func=cmd_migrate)
    token = sub.add_parser("token", help="print a signed JWT for local use")
    token.add_argument("--tenant", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--role", choices=ROLES, default="user")
    token.add_argument("--ttl", type=int, help="lifetime in seconds (default: JWT_EXPIRY)")
    token.add_argument("--private-key", help="PEM private key to sign with instead of JWT_SECRET")
    token.add_argument("--algorithm", help="signing algorithm (default HS256, or RS256 with a key)")
    token.set_defaults(func=cmd_token)
    sub.add_parser(
        "check-config", help="print the effective settings and every problem"
    ).set_defaults(func=cmd_check_config)
    listing = sub.add_parser(
        "settings", help="print every setting: the example TOML file or the reference page"
    )
    form = listing.add_mutually_exclusive_group(required=True)
    form.add_argument(
        "--example-toml", action="store_true", help="config/notifyd.example.toml, every default"
    )
    form.add_argument("--markdown", action="store_true", help="docs/settings.md, the reference")
    listing.set_defaults(func=cmd_settings)
    _add_operator_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
