"""`notifyd limits show | set | unset --tenant T`: a platform operator's per-tenant overrides
of the rate limits, daily quotas and socket caps (docs/limits.md).

Overrides live in `tenant_limits`; every running instance reads them again within
`NOTIFYD_LIMITS_REFRESH` seconds. Each change is one transaction with an audit row in the
tenant's audit log (`limits.set` / `limits.unset`, "via": "cli").
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from notifyd.limits import LIMIT_NAMES, RATE_NAMES, Limits
from notifyd.operator import connect
from notifyd.operator.output import iso, print_json, table
from notifyd.settings import Settings
from notifyd.store import audit
from notifyd.store import limits as store
from notifyd.store.audit import Author

BURST_NAMES = frozenset(name for name in LIMIT_NAMES if name.endswith("_burst"))


def flag(name: str) -> str:
    """`rate_user_burst` → `--rate-user-burst`."""
    return "--" + name.replace("_", "-")


def problems_of(values: dict[str, float]) -> list[str]:
    """What is wrong with the values to set, each naming its flag."""
    problems = []
    for name, value in values.items():
        if name not in RATE_NAMES and value != int(value):
            problems.append(f"{flag(name)}: a whole number")
        elif name in BURST_NAMES and value < 1:
            problems.append(f"{flag(name)}: at least 1 (sends allowed at once)")
        elif value < 0:
            problems.append(f"{flag(name)}: 0 (unlimited) or more")
    return problems


def _shown(value: float) -> str:
    return f"{value:g}" if value else "0 (unlimited)"


async def show_command(settings: Settings, *, tenant_id: str, as_json: bool) -> int:
    defaults = Limits.from_settings(settings)
    async with connect.postgres(settings) as pool:
        rows = {r.name: r for r in await store.overrides_of(pool, tenant_id)}
    effective = defaults.overridden({name: row.value for name, row in rows.items()})
    if as_json:
        print_json(
            {
                "tenant_id": tenant_id,
                "limits": asdict(effective),
                "defaults": asdict(defaults),
                "overrides": {
                    name: {
                        "value": row.value,
                        "updated_by": row.updated_by,
                        "updated_at": iso(row.updated_at),
                    }
                    for name, row in rows.items()
                },
            }
        )
        return connect.OK
    lines = []
    for name in LIMIT_NAMES:
        row = rows.get(name)
        source = (
            "default" if row is None else f"override by {row.updated_by} at {iso(row.updated_at)}"
        )
        lines.append(
            (name, _shown(getattr(effective, name)), _shown(getattr(defaults, name)), source)
        )
    print(table(("LIMIT", "VALUE", "DEFAULT", "SOURCE"), lines))
    print(f"tenant {tenant_id}: {len(rows)} override(s)")
    return connect.OK


async def set_command(
    settings: Settings, *, tenant_id: str, values: dict[str, float], author: Author
) -> int:
    problems = problems_of(values)
    if problems:
        for problem in problems:
            print(f"notifyd limits set: {problem}", file=sys.stderr)
        return connect.REFUSED
    async with connect.postgres(settings) as pool, pool.acquire() as conn, conn.transaction():
        await store.set_overrides(conn, tenant_id, values, author.user_id)
        await audit.record(conn, author.entry(tenant_id, "limits.set", {"set": values}))
    shown = ", ".join(f"{name}={value:g}" for name, value in values.items())
    print(f"tenant {tenant_id}: {shown} (every instance within {settings.limits_refresh:g} s)")
    return connect.OK


async def unset_command(
    settings: Settings, *, tenant_id: str, names: list[str], author: Author
) -> int:
    async with connect.postgres(settings) as pool, pool.acquire() as conn, conn.transaction():
        removed = await store.unset_overrides(conn, tenant_id, names)
        await audit.record(
            conn, author.entry(tenant_id, "limits.unset", {"unset": names, "removed": removed})
        )
    print(f"tenant {tenant_id}: {removed} override(s) removed; the defaults apply")
    return connect.OK
