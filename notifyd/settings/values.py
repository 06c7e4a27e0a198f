"""How a setting's text (from the environment or `.env`) or TOML value becomes its value.

Each parser accepts both forms (`a,b` or a TOML list; `k=v,w;k2=x` or a TOML table) and raises
`ValueError` with a message that never echoes a secret (only non-secret values are quoted), so
the loader can prefix it with where the value came from.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Any

ROLES = ("user", "service", "admin")
CHANNELS = ("email", "sms", "in_app")
DEFAULT_ID_PATTERN = r"[A-Za-z0-9._~:@|+=-]+"
# a reminder read this far early waits in the firer, holding its stream entry unacknowledged
MAX_REMINDER_LOOKAHEAD = 5.0
DEFAULT_SEND_POLICY = "user=in_app;service=email,sms,in_app;admin=email,sms,in_app"
# the ports a tenant's relay may listen on at a public address: SMTP, submission, implicit
# TLS, and the alternatives the large relay services offer (2525; Amazon SES: 2465, 2587)
EGRESS_DEFAULT_PORTS = (25, 465, 587, 2465, 2525, 2587)
WEBHOOK_DEFAULT_PORTS = (443, 8443, 80, 8080)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def to_str(value: Any) -> str:
    """Text as written; a TOML number is taken as its text (`port = 25` for a string key)."""
    if not isinstance(value, str | int | float):
        raise ValueError("must be a string")
    return str(value)


def to_int(value: Any) -> int:
    """An integer; `true` is not one (Python would say 1)."""
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {value!r}") from None


def to_float(value: Any) -> float:
    """A finite number: `nan` would pass every bound check (each comparison is false)."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number, got {value!r}")
    return number


def to_bool(value: Any) -> bool:
    """Django-style: 1/true/yes/on, 0/false/no/off and empty, in any case."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def to_list(value: Any) -> tuple[str, ...]:
    """`a, b,,` or a TOML list (or a set, from `dataclasses.replace`) → the non-empty items,
    stripped."""
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(str(item).strip() for item in value if str(item).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def to_networks(value: Any) -> tuple[Network, ...]:
    """`127.0.0.1, 10.0.0.0/8, ::1` → networks (an address alone is a network of one)."""
    networks = []
    for part in to_list(value):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or network: {part!r}") from None
    return tuple(networks)


def to_ports(value: Any) -> tuple[int, ...]:
    """`25, 587` → ports; `any` (or nothing) → () meaning every port."""
    parts = to_list(value)
    if [p.lower() for p in parts] == ["any"]:
        return ()
    ports = []
    for part in parts:
        port = to_int(part)
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
        names = frozenset(to_list(tenants))
        if not names:
            raise ValueError(f"user {user!r}: list its tenants, or * for all")
        if "*" in names and len(names) > 1:
            raise ValueError(f"user {user!r}: * (every tenant) or a list of tenants, not both")
        mapping[str(user)] = names
    return mapping


def parse_send_policy(value: Any) -> Mapping[str, frozenset[str]]:
    """`user=in_app;service=email,sms,in_app` (or a TOML table of lists) → role → channels;
    a role not named may send nothing."""
    table = _to_table(value, "role=channel,channel")
    policy: dict[str, frozenset[str]] = {role: frozenset() for role in ROLES}
    for role, channels in table.items():
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        names = frozenset(to_list(channels))
        unknown = names - set(CHANNELS)
        if unknown:
            raise ValueError(
                f"unknown channel {sorted(unknown)[0]!r} (channels: {', '.join(CHANNELS)})"
            )
        policy[role] = names
    return policy


def tenants_list(value: tuple[str, ...]) -> tuple[str, ...]:
    """A source's tenants: a list, or `*` alone; empty would silently close the source."""
    if not value:
        raise ValueError(
            "list the tenants the source may publish for, or * for all (to switch ingestion "
            "off: NOTIFYD_EVENTS_ENABLED=false)"
        )
    if "*" in value and len(value) > 1:
        raise ValueError("* (every tenant) or a list of tenants, not both")
    return value
