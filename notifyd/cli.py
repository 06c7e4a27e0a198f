"""`notifyd` command line: serve, migrate, token, check-config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from notifyd import __version__, logs
from notifyd.settings import ROLES, Settings, SettingsError, describe, load_settings


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
    print("configuration is valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifyd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"notifyd {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML settings file (default: $NOTIFYD_CONFIG)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the daemon").set_defaults(func=cmd_serve)
    migrate = sub.add_parser("migrate", help="apply pending SQL migrations")
    migrate.add_argument("--sql-dir", help="migrations folder (default: the project's sql/)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
