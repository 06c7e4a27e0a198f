"""Per-tenant overrides of the limits (`tenant_limits`), and every instance's copy of them.

The table holds only the exceptions an operator set, so each instance keeps all of it in
memory and reloads it every `NOTIFYD_LIMITS_REFRESH` seconds, in the background: a send
looks its tenant's limits up in a dict and never waits for PostgreSQL (a failed reload keeps
the copy it has and is tried again at the next refresh).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from notifyd.limits import Limits
from notifyd.store.pool import Conn, Executor

log = logging.getLogger("notifyd.store.limits")

ALL = "SELECT tenant_id, name, value FROM tenant_limits"

OF_TENANT = """
SELECT name, value, updated_by, updated_at FROM tenant_limits
WHERE tenant_id = $1 ORDER BY name
"""

UPSERT = """
INSERT INTO tenant_limits (tenant_id, name, value, updated_by) VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, name)
DO UPDATE SET value = excluded.value, updated_by = excluded.updated_by, updated_at = now()
"""

DELETE = "DELETE FROM tenant_limits WHERE tenant_id = $1 AND name = ANY($2::text[])"


@dataclass(frozen=True, slots=True)
class Override:
    """One of a tenant's overrides; its fields are OF_TENANT's columns, in order."""

    name: str
    value: float
    updated_by: str
    updated_at: datetime


async def overrides_of(executor: Executor, tenant_id: str) -> list[Override]:
    return [Override(*row) for row in await executor.fetch(OF_TENANT, tenant_id)]


async def set_overrides(
    conn: Conn, tenant_id: str, values: dict[str, float], updated_by: str
) -> None:
    await conn.executemany(
        UPSERT, [(tenant_id, name, value, updated_by) for name, value in values.items()]
    )


async def unset_overrides(conn: Conn, tenant_id: str, names: Sequence[str]) -> int:
    status = await conn.execute(DELETE, tenant_id, list(names))
    return int(status.split()[-1])


class TenantLimits:
    """The limits of every tenant, as this instance last read them."""

    def __init__(
        self,
        pool: Executor,
        defaults: Limits,
        refresh: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self.defaults = defaults
        self._refresh = refresh
        self._clock = clock
        self._by_tenant: dict[str, Limits] = {}
        self._loaded_at = float("-inf")
        self._loading: asyncio.Task[None] | None = None

    def of(self, tenant_id: str) -> Limits:
        """The tenant's limits, at once; starts a reload in the background when due."""
        if self._clock() - self._loaded_at >= self._refresh and self._loading is None:
            self._loading = asyncio.create_task(self._reload(), name="tenant-limits")
        return self._by_tenant.get(tenant_id, self.defaults)

    async def load(self) -> None:
        """Read the table now (at start-up, so the first sends see the overrides)."""
        rows = await self._pool.fetch(ALL)
        found: dict[str, dict[str, float]] = defaultdict(dict)
        for tenant_id, name, value in rows:
            found[tenant_id][name] = value
        self._by_tenant = {
            tenant: self.defaults.overridden(values) for tenant, values in found.items()
        }
        self._loaded_at = self._clock()

    async def _reload(self) -> None:
        try:
            await self.load()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._loaded_at = self._clock()  # tried: the next refresh tries again
            log.warning(
                "tenant limits not reloaded; keeping the last copy", extra={"error": repr(exc)}
            )
        finally:
            self._loading = None

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
