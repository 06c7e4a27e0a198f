"""Listings generated from the declaration: `notifyd check-config`'s rows, the example TOML
file and the settings reference (`notifyd settings --example-toml` / `--markdown`)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from notifyd.settings.load import RETIRED
from notifyd.settings.model import Settings
from notifyd.settings.spec import SPECS, Spec
from notifyd.settings.values import CHANNELS

SECTIONS = {
    "server": "",
    "database": "PostgreSQL",
    "redis": "",
    "email": "the global SMTP relay; tenants may configure their own",
    "auth": "incoming tokens and `notifyd token`",
    "twilio": "the platform's Twilio account; tenants may configure their own",
    "limits": "bounds on what callers send",
    "delivery": "",
    "egress": 'tenants\' own SMTP relays (docs/limits.md, "Egress policy for tenant relays")',
    "tenant_config": "tenants' SMTP, Twilio and templates from the team's auth service "
    '(README: "Tenant configuration from your auth service")',
    "webhooks": 'tenants\' webhook endpoints (README: "Webhooks"; docs/limits.md, "Webhooks")',
    "events": 'domain events from other services (README: "Events from other services")',
    "actors": "supervision of the background actors",
    "realtime": "WebSockets",
    "retention": "PostgreSQL rows in a final state, deleted by the housekeeper; 0 keeps forever",
    "quotas": "rates, daily quotas, socket caps (docs/limits.md); 0 = unlimited; "
    "per-tenant overrides: `notifyd limits set`",
}
HEADER = """\
# notifyd settings file: every key, with its default and the environment variable that
# overrides it. Point notifyd at this file with NOTIFYD_CONFIG=/etc/notifyd/notifyd.toml or
# `notifyd --config FILE ...`. Precedence, lowest first: built-in default, this file, `.env`
# in the working folder, the process environment. `notifyd check-config` prints the result.
# Keep secrets (passwords, tokens, JWT_SECRET) in the environment file systemd reads, not here.
# Generated from notifyd/settings/model.py: `notifyd settings --example-toml > FILE`.
"""
URLS = {"database_url", "redis_url", "rabbitmq_url"}


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


def _shown(spec: Spec, value: Any) -> str:
    """A value as the environment would spell it, secrets masked."""
    if spec.name in URLS:
        return mask_url(str(value))
    if spec.secret:
        return "***" if value else "(unset)"
    if spec.name == "egress_allowed_ports" and not value:
        return "any"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, Mapping):
        return ";".join(f"{key}={','.join(sorted(items))}" for key, items in value.items())
    return str(value)


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(environment name, TOML key, shown value) for every setting, secrets masked."""
    rows = [(spec.env[0], spec.toml, _shown(spec, getattr(settings, spec.name))) for spec in SPECS]
    rows.append(("(derived)", "redis url", mask_url(settings.effective_redis_url)))
    rows.append(("(derived)", "jwt algorithms", ",".join(settings.effective_jwt_algorithms)))
    return rows


def _toml(value: Any) -> str:
    """A default as TOML: strings quoted, lists and tables inline (in CHANNELS order)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, frozenset):
        order = {name: i for i, name in enumerate(CHANNELS)}
        return _toml(sorted(value, key=lambda item: (order.get(item, len(order)), item)))
    if isinstance(value, Mapping):
        inner = ", ".join(f"{key} = {_toml(items)}" for key, items in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return repr(value)


def _names(spec: Spec) -> str:
    more = f" (or {', '.join(spec.env[1:])})" if len(spec.env) > 1 else ""
    return spec.env[0] + more + (" (secret)" if spec.secret else "")


def example_toml() -> str:
    """config/notifyd.example.toml: every key with its default, environment name and help."""
    lines = [HEADER.rstrip("\n")]
    for section, note in SECTIONS.items():
        header = f"[{section}]"
        lines += ["", f"{header:<29} # {note}" if note else header]
        for spec in SPECS:
            if spec.toml.split(".")[0] != section:
                continue
            assignment = f"{spec.toml.split('.', 1)[1]} = {_toml(spec.default)}"
            bounds = f"; {spec.bounds}" if spec.bounds else ""
            lines.append(f"{assignment:<29} # {_names(spec)}: {spec.help}{bounds}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/settings.md: the reference of every setting."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `notifyd/settings/model.py` by `notifyd settings --markdown`; do not edit",
        "by hand (`tests/test_example_config.py` fails when it is stale). Precedence, lowest",
        "first: built-in default, the TOML file (`NOTIFYD_CONFIG` or `--config`; example:",
        "`config/notifyd.example.toml`), `.env` in the working folder, the process environment.",
        "`notifyd check-config` prints the effective values and every problem at once.",
        "Lists are comma-separated in the environment; tables are `key=a,b;key2=c`.",
    ]
    for section, note in SECTIONS.items():
        lines += ["", f"## [{section}]", ""]
        if note:
            lines += [note[0].upper() + note[1:] + ".", ""]
        lines += [
            "| Environment | TOML key | Type | Default | Bounds | Help |",
            "|---|---|---|---|---|---|",
        ]
        for spec in SPECS:
            if spec.toml.split(".")[0] != section:
                continue
            default = "(unset)" if spec.secret and not spec.default else _toml(spec.default)
            bounds = spec.bounds + (f" ({spec.note})" if spec.note else "")
            names = " or ".join(f"`{env}`" for env in spec.env) + (
                " (secret)" if spec.secret else ""
            )
            cells = [names, f"`{spec.toml}`", spec.kind, f"`{default}`", bounds]
            lines.append("| " + " | ".join(_cell(c) for c in [*cells, spec.help]) + " |")
    lines += [
        "",
        "## Retired",
        "",
        "Still recognised so that an old file or environment gets a warning (logged at start,",
        "printed by `notifyd check-config`) instead of silence; they have no effect.",
        "",
        "| Environment | TOML key | Why |",
        "|---|---|---|",
    ]
    lines += [f"| `{env}` | `{toml}` | {why} |" for env, (toml, why) in RETIRED.items()]
    return "\n".join(lines) + "\n"
