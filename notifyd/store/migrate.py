"""Plain SQL migrations from `notifyd/sql/`, applied in order, each once, each in a transaction.

The files ship inside the package (package data in pyproject.toml) and are read through
importlib.resources, so a regular `pip install` (a wheel in site-packages, a container image)
migrates without the source tree beside it. `notifyd migrate --sql-dir` still takes a folder.

A session-level advisory lock serialises concurrent runs (two instances starting together, or
`ExecStartPre` racing a manual run): the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

from notifyd.store.pool import Conn

log = logging.getLogger("notifyd.migrate")

# any 64-bit constant unique to notifyd; pg_advisory_lock takes a bigint
MIGRATION_LOCK_ID = 0x6E6F74696679
# the package's own migrations, wherever it is installed (a Path for a plain install)
DEFAULT_SQL_DIR: Traversable = resources.files("notifyd").joinpath("sql")
_FILE = re.compile(r"^(\d{4})_[A-Za-z0-9_]+\.sql$")

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)"""
APPLIED = "SELECT version, checksum FROM schema_migrations"
RECORD = "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)"


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    path: Traversable

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def discover(sql_dir: Traversable = DEFAULT_SQL_DIR) -> list[Migration]:
    """The migrations in `sql_dir`, in version order; names not `NNNN_word.sql` are ignored."""
    if not sql_dir.is_dir():
        raise MigrationError(f"no migrations folder at {sql_dir}")
    found = [
        Migration(p.name.removesuffix(".sql"), p)
        for p in sorted(sql_dir.iterdir(), key=lambda p: p.name)
        if _FILE.match(p.name) and p.is_file()
    ]
    numbers = [m.version[:4] for m in found]
    if len(numbers) != len(set(numbers)):
        raise MigrationError(f"two migrations share a number in {sql_dir}")
    return found


async def apply(conn: Conn, sql_dir: Traversable = DEFAULT_SQL_DIR) -> list[str]:
    """Apply what is pending; return the versions applied by this call."""
    migrations = discover(sql_dir)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(CREATE_TABLE)
        applied = {r["version"]: r["checksum"] for r in await conn.fetch(APPLIED)}
        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    log.warning(
                        "applied migration changed on disk", extra={"version": migration.version}
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(RECORD, migration.version, migration.checksum)
            log.info("migration applied", extra={"version": migration.version})
            done.append(migration.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def pending(conn: Conn, sql_dir: Traversable = DEFAULT_SQL_DIR) -> list[str]:
    """Versions on disk not yet applied: `serve` refuses to start on an old schema."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    applied = {r["version"] for r in await conn.fetch(APPLIED)} if exists else set()
    return [m.version for m in discover(sql_dir) if m.version not in applied]
