"""Templates table: per tenant, one row per (template_key, channel, locale).

Locale `''` is the row used when no locale-specific one matches. Locales are stored in one
canonical spelling (`pt-BR`, never `pt_br`), so a lookup is a plain equality.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from notifyd import tags
from notifyd.store.pool import Conn, Executor


@dataclass(frozen=True, slots=True)
class Template:
    """A stored template as the API shows it; its fields are the columns read, in order."""

    template_key: str
    channel: str
    locale: str
    subject: str | None
    text_body: str
    html_body: str | None
    created_at: datetime
    updated_at: datetime


COLUMNS = ", ".join(f.name for f in fields(Template))

UPSERT = f"""
INSERT INTO templates (tenant_id, template_key, channel, locale, subject, text_body, html_body)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (tenant_id, template_key, channel, locale) DO UPDATE
SET subject = EXCLUDED.subject, text_body = EXCLUDED.text_body,
    html_body = EXCLUDED.html_body, updated_at = now()
RETURNING {COLUMNS}, (xmax = 0) AS created
"""

GET = f"""
SELECT {COLUMNS} FROM templates
WHERE tenant_id = $1 AND template_key = $2 AND channel = $3 AND locale = $4
"""

# Keyset pagination in primary-key order: after (key, channel, locale) of the last row shown.
LIST = f"""
SELECT {COLUMNS} FROM templates
WHERE tenant_id = $1
  AND ($2::text IS NULL OR template_key = $2)
  AND ($3::text IS NULL OR channel = $3)
  AND ($4::text IS NULL OR (template_key, channel, locale) > ($4, $5::text, $6::text))
ORDER BY template_key, channel, locale
LIMIT $7
"""

DELETE = """
DELETE FROM templates
WHERE tenant_id = $1 AND template_key = $2 AND channel = $3 AND locale = $4
RETURNING template_key
"""

# Every row that could answer one resolve (StoredTemplate's columns, in order); Python picks the
# best by the fallback order.
CANDIDATES = """
SELECT subject, text_body, html_body, locale FROM templates
WHERE tenant_id = $1 AND template_key = $2 AND channel = $3 AND locale = ANY($4::text[])
"""


@dataclass(frozen=True, slots=True)
class NewTemplate:
    tenant_id: str
    template_key: str
    channel: str
    locale: str
    subject: str | None
    text_body: str
    html_body: str | None


@dataclass(frozen=True, slots=True)
class StoredTemplate:
    """The row that answers a resolve; `locale` is the row's own (`''` for the fallback row)."""

    subject: str | None
    text_body: str
    html_body: str | None
    locale: str


def locale_candidates(locale: str | None, default_locale: str) -> list[str]:
    """The locales to try, best first: exact, its language, the default (and its language), ''."""
    order: list[str] = []
    for wanted in (locale, default_locale):
        if not wanted:
            continue
        exact = tags.normalize_locale(wanted)
        for candidate in (exact, exact.split("-")[0]):
            if candidate not in order:
                order.append(candidate)
    order.append("")
    return order


async def upsert(conn: Conn, row: NewTemplate) -> tuple[Template, bool]:
    """Insert or replace: the stored row, and whether it did not exist before."""
    record = await conn.fetchrow(
        UPSERT,
        row.tenant_id,
        row.template_key,
        row.channel,
        tags.normalize_locale(row.locale),
        row.subject,
        row.text_body,
        row.html_body,
    )
    assert record is not None
    *columns, created = record
    return Template(*columns), created


async def get(
    conn: Executor, tenant_id: str, template_key: str, channel: str, locale: str
) -> Template | None:
    row = await conn.fetchrow(GET, tenant_id, template_key, channel, tags.normalize_locale(locale))
    return None if row is None else Template(*row)


async def list_templates(
    conn: Executor,
    tenant_id: str,
    *,
    template_key: str | None = None,
    channel: str | None = None,
    after: tuple[str, str, str] | None = None,
    limit: int,
) -> list[Template]:
    """A page of the tenant's templates in (key, channel, locale) order."""
    after_key, after_channel, after_locale = after or (None, None, None)
    rows = await conn.fetch(
        LIST, tenant_id, template_key, channel, after_key, after_channel, after_locale, limit
    )
    return [Template(*row) for row in rows]


async def delete(conn: Conn, tenant_id: str, template_key: str, channel: str, locale: str) -> bool:
    """True when a row was deleted."""
    deleted = await conn.fetchval(
        DELETE, tenant_id, template_key, channel, tags.normalize_locale(locale)
    )
    return deleted is not None


async def resolve(
    executor: Executor,
    tenant_id: str,
    template_key: str,
    channel: str,
    locale: str | None,
    default_locale: str,
) -> StoredTemplate | None:
    """The tenant's template to render, by fallback order, or None when it stored none.

    Order: the exact locale (`pt-BR`), its language (`pt`), the tenant's default locale
    (`default_locale`, then its language), the `''` row. One query fetches every candidate
    row. notifyd's built-in, the last resort, is `compose.resolve`'s: the store knows rows,
    not the renderer's templates (docs/architecture.md, "Layers").
    """
    order = locale_candidates(locale, default_locale)
    rows = await executor.fetch(CANDIDATES, tenant_id, template_key, channel, order)
    by_locale = {row["locale"]: row for row in rows}
    for candidate in order:
        row = by_locale.get(candidate)
        if row is not None:
            return StoredTemplate(*row)
    return None
