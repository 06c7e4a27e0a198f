"""Templates: a tenant's admins store, read, delete and preview them.

Services may read and preview (a backend checks its templates render before it sends);
only admins write. A template must compile before it is stored, so a syntax error is the
admin's 422 now, not every sender's failure later. Missing variables can only be found with
a context, which is what the preview route is for.

With a tenant configuration source (NOTIFYD_TENANT_CONFIG_URL), its templates win over stored
ones of the same key, channel and locale: the list shows them first (`"source":
"tenant_config"`, read-only), a PUT of one answers 409 `sourced-field`, and the preview and
every send render them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from aiohttp import web

from notifyd import tags
from notifyd.auth import policy
from notifyd.auth.identity import Identity
from notifyd.compose import Composer, render_limits
from notifyd.http.context import (
    Services,
    audit_entry,
    identity,
    services,
    source_unavailable,
    tenant_settings_of,
)
from notifyd.http.problems import FieldError, Problem, forbidden, invalid, not_found, unsendable
from notifyd.http.responses import iso, json_response
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.providers import render
from notifyd.providers.render import Rendered, TemplateError, TemplateSource
from notifyd.providers.render_bounds import RenderLimits
from notifyd.schemas.templates import TemplatePreview, TemplatePut
from notifyd.settings import CHANNELS
from notifyd.store import audit
from notifyd.store import templates as store
from notifyd.store.tenants import SourcedTemplate, SourceUnavailable, TemplateId


def template_json(t: store.Template) -> dict[str, Any]:
    return {
        **asdict(t),
        "created_at": iso(t.created_at),
        "updated_at": iso(t.updated_at),
        "source": "stored",
    }


def sourced_json(key: TemplateId, t: SourcedTemplate) -> dict[str, Any]:
    """A template the tenant configuration source gives (read-only; never stored)."""
    template_key, channel, locale = key
    return {
        "template_key": template_key,
        "channel": channel,
        "locale": locale,
        "subject": t.subject,
        "text_body": t.text_body,
        "html_body": t.html_body,
        "created_at": None,
        "updated_at": None,
        "source": "tenant_config",
    }


async def _sourced_templates(ctx: Services, tenant_id: str) -> Mapping[TemplateId, SourcedTemplate]:
    try:
        source = await ctx.tenant_settings.sourced(tenant_id)
    except SourceUnavailable as exc:
        raise source_unavailable(exc) from None
    return {} if source is None else source.templates


def _check_read(caller: Identity) -> None:
    if not policy.may_read_templates(caller):
        raise forbidden("only admins and services may read templates")


def _check_write(caller: Identity) -> None:
    if not policy.may_write_templates(caller):
        raise forbidden("only admins may change templates")


def _path_problems(request: web.Request) -> tuple[str, str, list[FieldError]]:
    """The path's template_key and channel, and what is wrong with them."""
    template_key = request.match_info["template_key"]
    channel = request.match_info["channel"]
    errors = []
    if not tags.TEMPLATE_KEY.fullmatch(template_key):
        errors.append(FieldError("template_key", "must be 1-128 letters, digits and _ . : - only"))
    if channel not in CHANNELS:
        errors.append(FieldError("channel", f"must be one of: {', '.join(CHANNELS)}"))
    return template_key, channel, errors


def _item(request: web.Request) -> tuple[str, str, str]:
    """The path's template_key and channel and the query's locale, every fault in one 422."""
    template_key, channel, errors = _path_problems(request)
    query = read_query(request, schemas(request).template_item_query, also=errors)
    return template_key, channel, query.locale


def _label(template_key: str, channel: str, locale: str) -> str:
    return f"template {template_key!r} ({channel}, {locale or 'default locale'})"


def _compile_errors(source: TemplateSource, name: str, limits: RenderLimits) -> list[FieldError]:
    return [FieldError(e.field, e.reason) for e in render.check(source, limits=limits, name=name)]


def _source(body: TemplatePut | TemplatePreview) -> TemplateSource:
    return TemplateSource(
        subject=body.subject, text_body=body.text_body or "", html_body=body.html_body
    )


def _template_problem(error: TemplateError) -> Problem:
    """A template that cannot render as asked (no such stored template, a variable the context
    lacks): the body's shape was fine, so `unsendable`, as for a send."""
    return unsendable([FieldError(error.field, error.reason)])


async def list_templates(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    _check_read(caller)
    query = read_query(request, schemas(request).template_query)
    limit, template_key, channel = query.limit, query.template_key, query.channel
    after: tuple[str, str, str] | None = None
    if query.after is not None:  # the model checked it has two slashes
        key, cursor_channel, cursor_locale = query.after.split("/")
        after = (key, cursor_channel, cursor_locale)
    rows = await store.list_templates(
        ctx.pool,
        caller.tenant_id,
        template_key=template_key,
        channel=channel,
        after=after,
        limit=limit + 1,
    )
    headers: dict[str, str] = {}
    # the source's templates, read-only, ahead of the stored ones on the first page
    sourced = [
        sourced_json(key, t)
        for key, t in sorted((await _sourced_templates(ctx, caller.tenant_id)).items())
        if after is None
        and (template_key is None or key[0] == template_key)
        and (channel is None or key[1] == channel)
    ]
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        cursor = f"{last.template_key}/{last.channel}/{last.locale}"
        next_url = request.rel_url.update_query({"after": cursor, "limit": str(limit)})
        headers["Link"] = f'<{next_url}>; rel="next"'
    return json_response([*sourced, *(template_json(r) for r in rows)], headers=headers)


async def put_template(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    _check_write(caller)
    template_key, channel, path_errors = _path_problems(request)
    body = await read_model(request, schemas(request).template_put, also=path_errors)
    locale = tags.normalize_locale(body.locale or "")
    if (template_key, channel, locale) in await _sourced_templates(ctx, caller.tenant_id):
        raise Problem(
            409,
            "this template is set by the tenant configuration source (NOTIFYD_TENANT_CONFIG_URL)"
            ": change it there",
            kind="sourced-field",
            errors=[FieldError("template_key", "is set by the tenant configuration source")],
        )
    source = _source(body)
    errors = _compile_errors(
        source, _label(template_key, channel, locale), render_limits(ctx.settings)
    )
    if errors:
        raise invalid(errors)
    row = store.NewTemplate(
        tenant_id=caller.tenant_id,
        template_key=template_key,
        channel=channel,
        locale=locale,
        subject=source.subject,
        text_body=source.text_body,
        html_body=source.html_body,
    )
    async with ctx.pool.acquire() as conn, conn.transaction():
        stored, created = await store.upsert(conn, row)
        await audit.record(
            conn,
            audit_entry(
                request,
                "template.put",
                {
                    "template_key": template_key,
                    "channel": channel,
                    "locale": locale,
                    "created": created,
                },
            ),
        )
    return json_response(template_json(stored))


async def get_template(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    _check_read(caller)
    template_key, channel, locale = _item(request)
    key = (template_key, channel, tags.normalize_locale(locale))
    sourced = (await _sourced_templates(ctx, caller.tenant_id)).get(key)
    if sourced is not None:  # it wins over a stored row of the same locale
        return json_response(sourced_json(key, sourced))
    row = await store.get(ctx.pool, caller.tenant_id, template_key, channel, locale)
    if row is None:
        raise not_found("template")
    return json_response(template_json(row))


async def delete_template(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    _check_write(caller)
    template_key, channel, locale = _item(request)
    locale = tags.normalize_locale(locale)
    async with ctx.pool.acquire() as conn, conn.transaction():
        deleted = await store.delete(conn, caller.tenant_id, template_key, channel, locale)
        if not deleted:
            raise not_found("template")
        await audit.record(
            conn,
            audit_entry(
                request,
                "template.delete",
                {"template_key": template_key, "channel": channel, "locale": locale},
            ),
        )
    return web.Response(status=204)


async def preview_template(request: web.Request) -> web.Response:
    """Render a stored template (`template_key` + `channel`) or an inline draft with `context`."""
    ctx = services(request)
    caller = identity(request)
    _check_read(caller)
    body = await read_model(request, schemas(request).template_preview)
    context = body.context or {}
    if body.template_key is not None:
        assert body.channel is not None
        try:
            # with the tenant's default locale, as a send would be rendered
            rendered = await Composer(
                ctx.pool,
                ctx.settings.default_locale,
                limits=render_limits(ctx.settings),
                tenants=functools.partial(tenant_settings_of, ctx),
            ).compose(
                tenant_id=caller.tenant_id,
                channel=body.channel,
                template_key=body.template_key,
                context=context,
                subject=None,
                message=None,
                locale=body.locale or None,
            )
        except TemplateError as error:
            raise _template_problem(error) from None
    else:
        source = _source(body)
        errors = _compile_errors(source, "draft", render_limits(ctx.settings))
        if errors:
            raise invalid(errors)
        try:
            rendered = render.render(
                source, context, limits=render_limits(ctx.settings), name="draft"
            )
        except TemplateError as error:
            raise _template_problem(error) from None
    return json_response(_rendered_json(rendered))


def _rendered_json(rendered: Rendered) -> dict[str, Any]:
    return {"subject": rendered.subject, "text": rendered.text, "html": rendered.html}


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/templates/", list_templates)
        app.router.add_post(f"{prefix}/templates/preview/", preview_template)
        item = f"{prefix}/templates/{{template_key}}/{{channel}}/"
        app.router.add_put(item, put_template)
        app.router.add_get(item, get_template)
        app.router.add_delete(item, delete_template)
