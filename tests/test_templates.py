"""Templates: sandboxed rendering, locale fallback, and the admins' REST routes.

Promises checked: a missing variable is an error naming it, never a blank; context keys that
are not identifiers (`"Candidate Name"`) are reachable; HTML is autoescaped and text is not; a
subject is always one line; the sandbox refuses to reach Python internals; resolve falls back
exact locale → language → tenant default → '' → built-in → none, in one tenant only; REST
writes compile first, are admin-only, leave audit rows, and another tenant sees nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest

from notifyd.compose import Composer, compose, resolve
from notifyd.providers import render as render_module
from notifyd.providers.builtin_templates import builtin, builtin_keys
from notifyd.providers.render import Rendered, TemplateError, TemplateSource
from notifyd.providers.render_bounds import RenderLimits
from notifyd.store import templates as store
from notifyd.store import tenants
from tests.helpers import Api

TENANT = "TEN-0001"
OTHER = "TEN-0002"
PROBLEM = "application/problem+json"
SEED_CONTEXT = {"Candidate Name": "John Doe", "Position": "Backend Developer", "Company": "Acme"}
LIMITS = RenderLimits()


def render(source: TemplateSource, context: Mapping[str, Any], **options: Any) -> Rendered:
    return render_module.render(source, context, limits=LIMITS, **options)


def text(body: str, context: Mapping[str, Any]) -> str:
    return render(TemplateSource(subject=None, text_body=body, html_body=None), context).text


def error_fields(body: Mapping[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


def error_for(body: Mapping[str, Any], field: str) -> str:
    return next(str(e["message"]) for e in body["errors"] if e["field"] == field)


# ------------------------------------------------------------------------------ rendering


def test_identifier_keys_are_plain_variables() -> None:
    assert text("{{ Position }} at {{ Company }}", SEED_CONTEXT) == "Backend Developer at Acme"


def test_a_key_with_a_space_is_reachable_through_ctx_and_its_slug() -> None:
    body = '{{ ctx["Candidate Name"] }} / {{ candidate_name }} / {{ position }}'
    assert text(body, SEED_CONTEXT) == "John Doe / John Doe / Backend Developer"


def test_a_slug_that_collides_is_not_defined_but_ctx_still_works() -> None:
    context = {"Candidate Name": "a", "candidate-name": "b", "Name": "c", "name": "d"}
    assert text("{{ name }}", context) == "d"  # a real key wins over another key's alias
    with pytest.raises(TemplateError):
        text("{{ candidate_name }}", context)  # two keys claim it: neither gets it
    assert text('{{ ctx["candidate-name"] }}{{ ctx["Name"] }}', context) == "bc"


def test_a_missing_variable_is_an_error_naming_it() -> None:
    source = TemplateSource(subject="Interview", text_body="Hi\n{{ Position }}", html_body=None)
    with pytest.raises(TemplateError) as caught:
        render(source, {"Company": "Acme"}, name="template 'interviewScheduling' (email, en)")
    assert caught.value.reason.startswith(
        "template 'interviewScheduling' (email, en) needs 'Position', "
        "which the context does not have"
    )
    assert "text_body line 2" in caught.value.reason
    assert (caught.value.field, caught.value.line) == ("context", 2)


def test_a_missing_key_of_a_present_value_is_an_error_too() -> None:
    with pytest.raises(TemplateError) as caught:
        text("{{ candidate.email }}", {"candidate": {"name": "x"}})
    assert "'email'" in caught.value.reason
    assert caught.value.field == "context"


def test_optional_values_use_defined_and_default_and_null_renders_empty() -> None:
    body = '{% if title is defined %}{{ title }} {% endif %}{{ name | default("there") }}|{{ n }}'
    assert text(body, {"n": None}) == "there|"


def test_html_is_autoescaped_and_text_is_not() -> None:
    source = TemplateSource(
        subject="{{ who }}", text_body="{{ who }}", html_body="<p>{{ ctx['Who Else'] }}</p>"
    )
    out = render(source, {"who": "<script>x</script>", "Who Else": "<script>y</script>"})
    assert out.text == "<script>x</script>"
    assert out.subject == "<script>x</script>"
    assert out.html == "<p>&lt;script&gt;y&lt;/script&gt;</p>"


def test_the_subject_is_one_line_and_bounded() -> None:
    source = TemplateSource(subject="Hi {{ name }}", text_body="x", html_body=None)
    out = render(source, {"name": "Eve\r\nBcc: victim@example.com\n"})
    assert out.subject == "Hi Eve Bcc: victim@example.com"
    long = render(source, {"name": "y" * 5000}).subject
    assert long is not None
    assert len(long) == 998


@pytest.mark.parametrize(
    "body",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ctx.__class__ }}",
        "{{ 'x' * 10000000 }}",
        "{{ 7 ** 100000 }}",
    ],
)
def test_the_sandbox_refuses_python_internals_and_huge_values(body: str) -> None:
    with pytest.raises(TemplateError) as caught:
        text(body, {})
    assert caught.value.field == "text_body"
    assert "not allowed" in caught.value.reason


def test_a_syntax_error_names_the_field_and_line() -> None:
    source = TemplateSource(subject=None, text_body="ok", html_body="<p>\n{% if %}</p>")
    with pytest.raises(TemplateError) as caught:
        render(source, {})
    assert (caught.value.field, caught.value.line) == ("html_body", 2)
    assert "html_body line 2" in caught.value.reason
    errors = render_module.check(
        TemplateSource(subject="{{", text_body="{% for %}", html_body=None), limits=LIMITS
    )
    assert [e.field for e in errors] == ["subject", "text_body"]


def test_compiled_templates_are_cached_by_source() -> None:
    source = TemplateSource(subject=None, text_body="cache-check {{ n }}", html_body=None)
    render(source, {"n": 1})
    before = render_module._compile.cache_info().hits
    assert render(source, {"n": 2}).text == "cache-check 2"
    assert render_module._compile.cache_info().hits == before + 1


@pytest.mark.parametrize(("key", "channel"), builtin_keys())
def test_builtins_render_with_only_the_required_time(key: str, channel: str) -> None:
    source = builtin(key, channel)
    assert source is not None
    out = render(source, {"interview_time": "10 March, 10:00"})
    assert "10 March, 10:00" in out.text
    full = render(source, {"interview_time": "t", "application_id": "APP-7", **SEED_CONTEXT})
    assert "with John Doe" not in full.text  # a candidate is not interviewing themself
    employer = render(source, {"interview_time": "t", "recipient_role": "employer", **SEED_CONTEXT})
    assert "with John Doe" in employer.text
    with pytest.raises(TemplateError) as caught:
        render(source, {"Position": "x"})
    assert "'interview_time'" in caught.value.reason


def test_there_is_no_generic_builtin() -> None:
    assert builtin("interview_reminder", "email") is not None
    assert builtin("anything_else", "email") is None


# ------------------------------------------------------------------------ resolve, compose


async def put_row(
    db: asyncpg.Connection, key: str, locale: str, tenant: str = TENANT, channel: str = "email"
) -> None:
    await store.upsert(
        db,
        store.NewTemplate(tenant, key, channel, locale, f"S {locale}", f"T {locale}", None),
    )


async def resolved_locale(db: asyncpg.Connection, key: str, locale: str | None) -> str | None:
    source = await resolve(db, TENANT, key, "email", locale, "en")
    if source is None:
        return "none"
    return source.locale  # None for a built-in


async def test_resolve_falls_back_locale_language_default_empty_builtin_none(
    db: asyncpg.Connection,
) -> None:
    for key in ("interview_reminder", "custom"):
        for locale in ("pt-BR", "pt", "en", ""):
            await put_row(db, key, locale)
    await put_row(db, "custom", "fr", tenant=OTHER)
    # Another tenant's rows never answer.
    assert await resolve(db, OTHER, "interview_reminder", "email", "fr", "en") == builtin(
        "interview_reminder", "email"
    )
    for key, last in (("interview_reminder", None), ("custom", "none")):
        assert await resolved_locale(db, key, "pt-BR") == "pt-BR"
        assert await resolved_locale(db, key, "pt_br") == "pt-BR"
        await store.delete(db, TENANT, key, "email", "pt-BR")
        assert await resolved_locale(db, key, "pt-BR") == "pt"
        await store.delete(db, TENANT, key, "email", "pt")
        assert await resolved_locale(db, key, "pt-BR") == "en"
        assert await resolved_locale(db, key, None) == "en"
        await store.delete(db, TENANT, key, "email", "en")
        assert await resolved_locale(db, key, "pt-BR") == ""
        await store.delete(db, TENANT, key, "email", "")
        assert await resolved_locale(db, key, "pt-BR") == last
    assert await resolved_locale(db, "custom", "fr") == "none"


async def test_compose_without_a_key_uses_subject_and_message(db: asyncpg.Connection) -> None:
    out = await compose(
        db,
        tenant_id=TENANT,
        channel="email",
        template_key=None,
        context=None,
        subject="Interview Scheduled",
        message="Tomorrow at 10.",
        locale=None,
        default_locale="en",
        limits=LIMITS,
    )
    assert out == Rendered(subject="Interview Scheduled", text="Tomorrow at 10.", html=None)


class CountingExecutor:
    """The real connection, counting the template and tenant-settings reads that reach it."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.template_reads = 0
        self.tenant_reads = 0

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        self.template_reads += query == store.CANDIDATES
        return await self.conn.fetch(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.tenant_reads += 1
        return await self.conn.fetchval(query, *args)


async def test_a_composer_resolves_each_template_once_and_renders_each_context(
    db: asyncpg.Connection,
) -> None:
    await put_row(db, "k", "")
    await store.upsert(
        db, store.NewTemplate(TENANT, "k", "email", "pt-BR", "S", "Olá {{ name }}", None)
    )
    await store.upsert(
        db, store.NewTemplate(OTHER, "k", "email", "", "S", "Other {{ name }}", None)
    )
    counting = CountingExecutor(db)
    composer = Composer(counting, "en", limits=LIMITS)  # type: ignore[arg-type]
    texts = []
    for index, (tenant, locale) in enumerate(
        [(TENANT, None)] * 20 + [(TENANT, "pt-BR")] * 10 + [(OTHER, None)] * 5
    ):
        out = await composer.compose(
            tenant_id=tenant,
            channel="email",
            template_key="k",
            context={"name": index},
            subject=None,
            message=None,
            locale=locale,
        )
        texts.append(out.text)
    assert texts[:2] == ["T ", "T "] and texts[20:22] == ["Olá 20", "Olá 21"]
    assert texts[30:] == [f"Other {i}" for i in range(30, 35)]
    # three distinct (tenant, locale) pairs: three template reads, one settings read per tenant
    assert (counting.template_reads, counting.tenant_reads) == (3, 2)
    with pytest.raises(TemplateError):
        await composer.compose(
            tenant_id=TENANT,
            channel="sms",
            template_key="k",
            context={},
            subject=None,
            message=None,
            locale=None,
        )


async def test_a_composer_falls_back_to_the_tenants_default_locale(
    db: asyncpg.Connection,
) -> None:
    await put_row(db, "k", "")
    await put_row(db, "k", "pt-BR")
    await put_row(db, "k", "pt-BR", tenant=OTHER)
    await put_row(db, "k", "", tenant=OTHER)
    # as notifyd's pool does: JSON documents in and out as Python values
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    async with db.transaction():
        await tenants.update(db, TENANT, None, default_locale="pt-BR")
    composer = Composer(db, "en", limits=LIMITS)
    args: dict[str, Any] = {"channel": "email", "template_key": "k", "context": {}}
    args |= {"subject": None, "message": None, "locale": "fr"}
    assert (await composer.compose(tenant_id=TENANT, **args)).text == "T pt-BR"
    # the other tenant set no default: the daemon's (en), then its '' template
    assert (await composer.compose(tenant_id=OTHER, **args)).text == "T "


async def test_compose_renders_the_seed_context_and_refuses_unknown_keys(
    db: asyncpg.Connection,
) -> None:
    await store.upsert(
        db,
        store.NewTemplate(
            TENANT,
            "interviewScheduling",
            "email",
            "",
            None,
            "Dear {{ candidate_name }}, your interview for {{ Position }} at {{ Company }}.",
            None,
        ),
    )
    args: dict[str, Any] = {
        "tenant_id": TENANT,
        "locale": "de",
        "default_locale": "en",
        "limits": LIMITS,
    }
    out = await compose(
        db,
        channel="email",
        template_key="interviewScheduling",
        context=SEED_CONTEXT,
        subject="Given subject",
        message=None,
        **args,
    )
    assert out.text == "Dear John Doe, your interview for Backend Developer at Acme."
    assert out.html is None  # text-only template
    assert out.subject == "Given subject"  # the template has none
    with pytest.raises(TemplateError) as caught:
        await compose(
            db,
            channel="email",
            template_key="interviewScheduling",
            context={"Candidate Name": "x", "Position": "x"},
            subject=None,
            message=None,
            **args,
        )
    assert "needs 'Company'" in caught.value.reason
    with pytest.raises(TemplateError) as caught:
        await compose(
            db, channel="sms", template_key="x", context={}, subject=None, message=None, **args
        )
    assert caught.value.reason == "unknown template_key 'x' for channel sms"
    assert caught.value.field == "template_key"


# ----------------------------------------------------------------------------------- REST

TEMPLATE = {
    "locale": "pt-BR",
    "subject": "Entrevista: {{ Position }}",
    "text_body": "Olá {{ candidate_name }}",
    "html_body": "<p>Olá {{ candidate_name }}</p>",
}


async def put(api: Api, path: str, body: Mapping[str, Any], **kw: Any) -> tuple[int, Any]:
    kw.setdefault("role", "admin")
    status, answer, _ = await api.request("PUT", path, json=body, **kw)
    return status, answer


@pytest.mark.parametrize("prefix", ["", "/api"])
async def test_crud_round_trip_with_audit_rows(
    api: Api, db: asyncpg.Connection, prefix: str
) -> None:
    item = f"{prefix}/templates/interviewScheduling/email/"
    status, body = await put(api, item, TEMPLATE, user="admin-1")
    assert status == 200, body
    assert body["locale"] == "pt-BR"
    assert body["text_body"] == TEMPLATE["text_body"]
    status, body = await put(api, item, {**TEMPLATE, "locale": "pt_br", "html_body": None})
    assert status == 200, body
    assert (body["locale"], body["html_body"]) == ("pt-BR", None)
    await put(api, f"{prefix}/templates/other/sms/", {"text_body": "x"})

    status, listed, _ = await api.get(f"{prefix}/templates/", role="service")
    assert status == 200
    assert [(t["template_key"], t["channel"]) for t in listed] == [
        ("interviewScheduling", "email"),
        ("other", "sms"),
    ]
    status, listed, _ = await api.get(f"{prefix}/templates/?template_key=other", role="admin")
    assert [t["template_key"] for t in listed] == ["other"]

    status, one, _ = await api.get(f"{item}?locale=pt-BR", role="service")
    assert status == 200
    assert one["subject"] == TEMPLATE["subject"]
    status, _, _ = await api.get(item, role="admin")  # locale '' does not exist
    assert status == 404

    status, _, _ = await api.request("DELETE", f"{item}?locale=pt-BR", role="admin", user="a2")
    assert status == 204
    status, _, _ = await api.request("DELETE", f"{item}?locale=pt-BR", role="admin")
    assert status == 404
    assert await db.fetchval("SELECT count(*) FROM templates") == 1

    rows = await db.fetch(
        "SELECT user_id, action, details::text AS details FROM audit_log "
        "WHERE action LIKE 'template.%' ORDER BY id"
    )
    audited = [(r["user_id"], r["action"], json.loads(r["details"])) for r in rows]
    assert [(u, a) for u, a, _ in audited] == [
        ("admin-1", "template.put"),
        ("user-1", "template.put"),
        ("user-1", "template.put"),
        ("a2", "template.delete"),
    ]
    assert audited[0][2]["created"] is True
    assert audited[1][2]["created"] is False
    assert audited[3][2] == {
        "role": "admin",
        "template_key": "interviewScheduling",
        "channel": "email",
        "locale": "pt-BR",
    }


# One daemon for every case: starting one per case would dominate the run time.
BAD_PUTS = [
    ("/templates/k/email/", {"text_body": "line 1\n{% if %}"}, "text_body", "line 2"),
    (
        "/templates/k/email/",
        {"text_body": "x", "html_body": "{{ x | nosuch }}"},
        "html_body",
        "nosuch",
    ),
    ("/templates/k/email/", {"text_body": "x", "subject": "a\nBcc: b"}, "subject", "single line"),
    ("/templates/k/email/", {"text_body": "x", "locale": "english!"}, "locale", "locale"),
    ("/templates/k/fax/", {"text_body": "x"}, "channel", "email"),
    ("/templates/bad%20key/sms/", {"text_body": "x"}, "template_key", "letters"),
    ("/templates/k/sms/", {"subject": "x"}, "text_body", "required"),
    ("/templates/k/sms/", {"text_body": "x", "body": "y"}, "body", "known"),
]


async def test_put_rejects_bad_templates_naming_the_field(api: Api, db: asyncpg.Connection) -> None:
    for path, body, field, words in BAD_PUTS:
        status, problem, headers = await api.request("PUT", path, json=body, role="admin")
        assert status == 422, (body, problem)
        assert headers["Content-Type"].startswith(PROBLEM)
        assert field in error_fields(problem), (body, problem)
        assert words in error_for(problem, field), (body, problem)
    assert await db.fetchval("SELECT count(*) FROM templates") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0


async def test_bodies_are_bounded_by_the_notification_limit(api: Api) -> None:
    limit = api.daemon.settings.notification_max_length
    status, problem = await put(api, "/templates/k/sms/", {"text_body": "x" * (limit + 1)})
    assert status == 422
    assert error_fields(problem) == {"text_body"}


async def test_preview_renders_stored_builtin_and_inline_templates(api: Api) -> None:
    await put(api, "/templates/interviewScheduling/email/", TEMPLATE)
    status, body, _ = await api.post(
        "/templates/preview/",
        {
            "template_key": "interviewScheduling",
            "channel": "email",
            "locale": "pt-BR",
            "context": {"Candidate Name": "<b>Jo</b>", "Position": "Dev"},
        },
        role="service",
    )
    assert status == 200, body
    assert body == {
        "subject": "Entrevista: Dev",
        "text": "Olá <b>Jo</b>",
        "html": "<p>Olá &lt;b&gt;Jo&lt;/b&gt;</p>",
    }
    status, body, _ = await api.post(
        "/api/templates/preview/",
        {
            "template_key": "interview_reminder",
            "channel": "sms",
            "context": {"interview_time": "9"},
        },
        role="admin",
    )
    assert status == 200, body
    assert body["text"] == "Reminder: interview on 9."
    status, body, _ = await api.post(
        "/templates/preview/",
        {"subject": "S {{ a }}", "text_body": "T {{ ctx['A b'] }}", "context": {"a": 1, "A b": 2}},
        role="admin",
    )
    assert status == 200, body
    assert body == {"subject": "S 1", "text": "T 2", "html": None}


async def test_preview_uses_the_tenants_default_locale_as_a_send_would(api: Api) -> None:
    await put(api, "/templates/interviewScheduling/email/", TEMPLATE)  # pt-BR only
    body = {"template_key": "interviewScheduling", "channel": "email", "context": SEED_CONTEXT}
    status, problem, _ = await api.post("/templates/preview/", body, role="admin")
    assert status == 422, problem  # no en template and no built-in for this key
    status, _ = await put(api, "/tenants/current/settings/", {"default_locale": "pt-BR"})
    assert status == 200
    status, shown, _ = await api.post("/templates/preview/", body, role="admin")
    assert (status, shown["text"]) == (200, "Olá John Doe")


BAD_PREVIEWS = [
    ({"text_body": "Hi {{ Position }}", "context": {}}, "context", "needs 'Position'"),
    ({"text_body": "x", "html_body": "{% for %}"}, "html_body", "line 1"),
    ({"text_body": "{{ ''.__class__ }}"}, "text_body", "not allowed"),
    (
        {"template_key": "nope", "channel": "sms", "context": {}},
        "template_key",
        "unknown template_key 'nope' for channel sms",
    ),
    (
        {"template_key": "interview_reminder", "channel": "email", "context": {}},
        "context",
        "needs 'interview_time'",
    ),
    ({"template_key": "k"}, "channel", "required"),
    ({"context": {}}, "text_body", "required"),
    ({"template_key": "k", "channel": "sms", "text_body": "x"}, "text_body", "not used"),
    ({"text_body": "x", "channel": "sms"}, "channel", "only used with template_key"),
]


async def test_preview_errors_are_422_naming_the_field(api: Api) -> None:
    for body, field, words in BAD_PREVIEWS:
        status, problem, headers = await api.post("/templates/preview/", body, role="admin")
        assert status == 422, (body, problem)
        assert headers["Content-Type"].startswith(PROBLEM)
        assert words in error_for(problem, field), (body, problem)


async def test_users_may_not_touch_templates_and_services_may_only_read(
    api: Api, db: asyncpg.Connection
) -> None:
    item = "/templates/k/sms/"
    preview = {"text_body": "x"}
    for role in ("user", "service"):
        status, problem = await put(api, item, {"text_body": "x"}, role=role)
        assert status == 403, problem
        status, _, _ = await api.request("DELETE", item, role=role)
        assert status == 403
    for method, path, body in (
        ("GET", "/templates/", None),
        ("GET", item, None),
        ("POST", "/templates/preview/", preview),
    ):
        status, problem, headers = await api.request(method, path, json=body, role="user")
        assert status == 403, (method, path)
        assert headers["Content-Type"].startswith(PROBLEM)
    assert await db.fetchval("SELECT count(*) FROM templates") == 0


async def test_another_tenant_sees_and_deletes_nothing(api: Api, db: asyncpg.Connection) -> None:
    item = "/templates/private/email/"
    assert (await put(api, item, {"text_body": "secret {{ x }}"}))[0] == 200
    status, listed, _ = await api.get("/templates/", role="admin", tenant=OTHER)
    assert (status, listed) == (200, [])
    status, _, _ = await api.get(item, role="admin", tenant=OTHER)
    assert status == 404
    status, _, _ = await api.request("DELETE", item, role="admin", tenant=OTHER)
    assert status == 404
    status, problem, _ = await api.post(
        "/templates/preview/",
        {"template_key": "private", "channel": "email", "context": {"x": 1}},
        role="admin",
        tenant=OTHER,
    )
    assert status == 422
    assert error_fields(problem) == {"template_key"}
    assert await db.fetchval("SELECT count(*) FROM templates WHERE tenant_id = $1", TENANT) == 1


async def test_list_pages_with_a_link_header(api: Api) -> None:
    for key in ("a", "b", "c"):
        for channel in ("email", "sms"):
            await put(api, f"/templates/{key}/{channel}/", {"text_body": key})
    seen: list[tuple[str, str]] = []
    path: str | None = "/templates/?limit=4"
    while path is not None:
        status, page, headers = await api.get(path, role="admin")
        assert status == 200, page
        seen += [(t["template_key"], t["channel"]) for t in page]
        link = headers.get("Link")
        path = link[link.index("<") + 1 : link.index(">")] if link else None
        if path is not None:
            path = path[path.index("/templates/") :]
    assert seen == [(k, c) for k in ("a", "b", "c") for c in ("email", "sms")]


async def test_a_bad_path_and_query_are_one_422_naming_each(api: Api) -> None:
    status, problem, _ = await api.get("/templates/bad%20key/fax/?locale=x%20y", role="admin")
    assert status == 422, problem
    assert error_fields(problem) == {"template_key", "channel", "locale"}
    status, problem, _ = await api.get("/templates/?after=no-slashes&limit=0", role="admin")
    assert status == 422, problem
    assert error_fields(problem) == {"after", "limit"}
    assert "cursor" in error_for(problem, "after")
