"""Tenants cost each other nothing: a tenant's template is bounded in work and in size.

Every test here would freeze or exhaust the daemon without the bounds (the event loop every
tenant shares, or its memory); none measures time: each input is large enough that the old
behaviour would run far past the suite's per-test timeout, and the bounded one is refused or
done by construction (a counted budget, a linear pass).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.ids import uuid7
from notifyd.keys import Keys
from notifyd.payloads import NotificationIntent
from notifyd.providers.render import (
    SUBJECT_MAX_LENGTH,
    TemplateError,
    TemplateSource,
    one_line_subject,
    render,
)
from notifyd.providers.render_bounds import RenderLimits
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

LIMITS = RenderLimits()
PROBLEM = "application/problem+json"
RECURSIVE = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"


def text(body: str, context: dict[str, Any] | None = None, limits: RenderLimits = LIMITS) -> str:
    source = TemplateSource(subject=None, text_body=body, html_body=None)
    return render(source, context or {}, limits=limits).text


# ------------------------------------------------------------------------ subject flattening

MILLION = 1_000_000


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        (" " * MILLION + "x", "x"),  # the quadratic case: a long run of spaces
        ("a" + " " * MILLION + "\n" + " " * MILLION + "b", "a b"),
        ("a" + " \x0b" * (MILLION // 2) + "b", "a b"),
        ("\u2028" * MILLION, ""),
    ],
    ids=["spaces", "spaces-around-a-break", "alternating", "separators"],
)
def test_subject_flattening_is_linear_in_the_subject(subject: str, expected: str) -> None:
    """`\\s*[breaks]+\\s*` backtracked over every run of spaces it could not match: 16,000
    spaces took 2.5 s, so these million-character subjects would take hours (past the
    suite's timeout). A split at the break class and a strip per part is one pass."""
    assert one_line_subject(subject) == expected


@pytest.mark.parametrize("char", ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_a_rendered_subject_never_carries_a_header_break(char: str) -> None:
    source = TemplateSource(subject="Hello{{ s }}", text_body="b", html_body=None)
    out = render(source, {"s": f"{char}Reply-To\t: x@evil.test"}, limits=LIMITS)
    assert out.subject == "Hello Reply-To\t: x@evil.test"
    assert one_line_subject("a\x00\x01\x7f\x9fb" + "c" * 2000) == "a b" + "c" * 995
    assert len(one_line_subject("c" * 2000)) == SUBJECT_MAX_LENGTH


# ------------------------------------------------------------------ pathological templates

PATHOLOGICAL = {
    "center": "{{ 'x'|center(1000000000) }}",
    "indent": "{{ 'a\nb'|indent(1000000000) }}",
    "indent-string": "{{ ('a\n' * 50000)|indent('y' * 1000) }}",
    "wordwrap-wrapstring": "{{ ('word ' * 10000)|wordwrap(1, wrapstring='y' * 100000) }}",
    "wordwrap-long-word": "{{ long|wordwrap(1) }}",
    "format-star": "{{ '%*s'|format(1000000000, 'x') }}",
    "format-width": "{{ '%1000000000s'|format('x') }}",
    "percent-width": "{{ '%.1000000000f' % 1.5 }}",
    "str-format-width": "{{ '{:>1000000000}'.format('x') }}",
    "str-format-nested-width": "{{ '{:>{w}}'.format('x', w=1000000000) }}",
    "format-map": "{{ '{a:>1000000000}'.format_map({'a': 1}) }}",
    "repeat": "{{ 'x' * 1000000000 }}",
    "repeat-in-a-loop": "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "nested-range": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    ),
    "nested-filtered": (
        "{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}{% endfor %}"
    ),
    "loops-over-context": "{% for a in long %}{% for b in long %}{% endfor %}{% endfor %}",
    "join-separator": "{{ range(100000)|join('x' * 100000) }}",
    "join-items": "{{ ([long] * 1000)|join }}",
    "str-join": "{{ ''.join([long] * 1000) }}",
    "print-a-list": "{{ [long] * 1000 }}",
    "print-a-namespace": "{% set ns = namespace(a=[long] * 1000) %}{{ ns }}",
    "print-dict-items": "{{ {'a': [long] * 1000}.items() }}",
    "format-a-list": "{{ '{}'.format([long] * 1000) }}",
    "concat-doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "plus-doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"
    ),
    "doubling-macro": (
        "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) ~ f(n + 1) }}{% endif %}{% endmacro %}"
        "{{ f(0) }}"
    ),
    "branching-loop-macro": (
        "{% macro f(n) %}{% if n < 40 %}{% for i in range(2) %}{{ f(n + 1) }}{% endfor %}"
        "{% endif %}{% endmacro %}{{ f(0) }}"
    ),
    "recursive-loop": (
        "{% for x in [1] recursive %}{% if loop.depth < 40 %}{{ loop([1, 1]) }}{% endif %}"
        "{% endfor %}"
    ),
    "ljust": "{{ 'x'.ljust(1000000000) }}",
    "zfill": "{{ '1'.zfill(1000000000) }}",
    "expandtabs": "{{ ('\t' * 1000).expandtabs(100000) }}",
    "replace-filter": "{{ long|replace('', 'y' * 1000) }}",
    "replace-method": "{{ long.replace('', 'y' * 1000) }}",
    "to-bytes": "{{ (5).to_bytes(1000000000, 'big')|length }}",
    "int-squaring": (
        "{% set ns = namespace(x=2 ** 4000) %}{% for i in range(40) %}"
        "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ 1 }}"
    ),
    "batch-fill": "{{ [1]|batch(1000000000, 'x')|list|length }}",
    "slice": "{{ [1]|slice(1000000000)|list|length }}",
    "sum-of-lists": "{{ ([[1] * 1000] * 100)|sum(start=[])|length }}",
    "tojson-indent": "{{ {'a': [1, 2]}|tojson(indent=1000000000) }}",
    "output-loop": "{% for i in range(100000) %}{{ long }}{% endfor %}",
    "compare-long-strings": "{% for i in range(100000) %}{{ long == long ~ '' }}{% endfor %}",
    "in-long-string": "{% for i in range(100000) %}{{ 'z' in long }}{% endfor %}",
    "slice-long-string": "{% for i in range(100000) %}{{ long[1:]|length }}{% endfor %}",
    "split-long-string": "{% for i in range(100000) %}{{ long.split('y')|length }}{% endfor %}",
    "count-long-string": "{% for i in range(100000) %}{{ long.count('y') }}{% endfor %}",
    "list-of-a-long-string": "{% for i in range(100000) %}{{ long|list|length }}{% endfor %}",
    "wordcount-long-string": "{% for i in range(100000) %}{{ long|wordcount }}{% endfor %}",
    "is-in-long-string": "{% for i in range(100000) %}{{ 'z' is in long }}{% endfor %}",
    "literal-output-loop": "{% for i in range(99000) %}" + "z" * 100 + "{% endfor %}",
}


@pytest.mark.parametrize("template", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_a_pathological_template_is_refused_with_a_reason(template: str) -> None:
    """Each would build gigabytes or loop billions of times unbounded."""
    with pytest.raises(TemplateError) as caught:
        text(template, {"long": "y" * 100_000})
    assert caught.value.field == "text_body"
    assert "over a limit" in caught.value.reason, caught.value.reason


def test_lipsum_is_not_offered() -> None:
    with pytest.raises(TemplateError) as caught:
        text("{{ lipsum(1000, min=1000, max=1000) }}")
    assert "needs 'lipsum'" in caught.value.reason


def test_a_list_cannot_grow_itself() -> None:
    """`l.extend(l)` doubles a list per step, unseen by the budget: lists are immutable here."""
    with pytest.raises(TemplateError) as caught:
        text("{% set l = [1] %}{% for i in range(60) %}{{ l.extend(l) }}{% endfor %}")
    assert "not allowed" in caught.value.reason


@pytest.mark.parametrize(
    ("template", "words"),
    [
        (RECURSIVE, "calls itself too deeply"),
        ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "calls itself too deeply"),
        (
            "{% macro f(n) %}{{ f(n + 1) ~ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "calls itself too deeply",
        ),
        ("{{ 10.0 ** 400 }}", "OverflowError"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
        ("{{ '%d' % 'x' }}", "TypeError"),
        ("{{ " + "(" * 1000 + "1" + ")" * 1000 + " }}", "nested too deeply"),
    ],
)
def test_any_failure_of_a_template_is_a_template_error(template: str, words: str) -> None:
    """A RecursionError (or any other exception) used to escape the render wrapper."""
    with pytest.raises(TemplateError) as caught:
        text(template)
    assert words in caught.value.reason, caught.value.reason
    assert caught.value.field == "text_body"


def test_a_failure_quoting_a_huge_value_is_cut_short() -> None:
    with pytest.raises(TemplateError) as caught:
        text("{{ '%d' % long }}", {"long": "y" * 100_000})
    assert len(caught.value.reason) < 400


def test_honest_templates_render_within_the_defaults() -> None:
    items = [{"name": f"item {n}", "price": n * 1.5} for n in range(1000)]
    body = (
        "{{ title|center(60) }}\n"
        "{% for item in items %}{{ '%-20s %8.2f'|format(item.name, item.price) }}\n"
        "{% endfor %}{{ items|map(attribute='name')|join(', ')|wordwrap(72)|indent(2) }}\n"
        "{{ '{:>10}|{:.3f}'.format('x', 2) }} {{ note|replace('a', 'A') }}"
        "{% for c in note if c != ' ' %}{{ c|upper }}{% endfor %}"
        "{{ items|length }} {{ items|selectattr('price', 'gt', 10)|list|length }}"
    )
    out = text(body, {"title": "Invoice", "items": items, "note": "a banana " * 1000})
    assert out.startswith(" " * 26 + "Invoice")
    assert "item 999" in out and "1000 993" in out


def test_the_limits_are_the_settings() -> None:
    small = RenderLimits(max_output=100, max_steps=50)
    assert text("x" * 100, limits=small) == "x" * 100
    with pytest.raises(TemplateError, match="output is longer than 100 characters"):
        text("x" * 101, limits=small)
    assert text("{{ ('x' * 200)|length }}", limits=small) == "200"
    with pytest.raises(TemplateError, match="build more than the 400 characters"):
        text("{{ ('x' * 401)|length }}", limits=small)
    assert text("{% for i in range(40) %}{% endfor %}ok", limits=small) == "ok"
    with pytest.raises(TemplateError, match="more than 50 steps"):
        text("{% for i in range(60) %}{% endfor %}", limits=small)


# ------------------------------------------------------------------- in the running daemon


async def test_a_tenants_recursive_template_fails_only_its_notification_in_a_batch(
    daemon_factory: DaemonFactory,
    settings_factory: Any,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    """One stream read holds tenant A's notification whose template recurses forever and
    tenant B's healthy one: B's is delivered, A's fails at once with the reason; the batch
    is not retried (a RecursionError used to crash it, again on every delivery)."""
    settings = settings_factory()
    keys = Keys(settings.redis_prefix)
    await db.execute(
        "INSERT INTO templates (tenant_id, template_key, channel, text_body) "
        "VALUES ('TEN-A', 'loop', 'in_app', $1)",
        RECURSIVE,
    )
    ids = {"TEN-A": (uuid7(), "loop", {}), "TEN-B": (uuid7(), "interview_reminder", None)}
    for tenant, (nid, template, context) in ids.items():
        await db.execute(
            "INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient,"
            " template_key, context) VALUES ($1, $2, 'reminders', 'u-1', 'in_app', 'u-1', $3, $4)",
            nid,
            tenant,
            template,
            orjson.dumps(context or {"interview_time": "Monday 10:00"}).decode(),
        )
        # both on the stream before the dispatcher's first read: one batch
        await redis.xadd(keys.intents, NotificationIntent(tenant, str(nid)).to_fields())
    await daemon_factory(settings)

    async def settled() -> bool:
        states = await db.fetch(
            "SELECT status FROM notifications WHERE id = ANY($1::uuid[])",
            [nid for nid, _, _ in ids.values()],
        )
        return all(s["status"] in ("sent", "failed") for s in states)

    await wait_for(settled, timeout=20)
    bad = await db.fetchrow("SELECT * FROM notifications WHERE id = $1", ids["TEN-A"][0])
    good = await db.fetchrow("SELECT * FROM notifications WHERE id = $1", ids["TEN-B"][0])
    assert good is not None and good["status"] == "sent" and "Monday 10:00" in good["body"]
    assert bad is not None and bad["status"] == "failed"
    assert "calls itself too deeply" in bad["last_error"]
    assert await redis.xlen(keys.dead_letters) == 0

    async def acknowledged() -> bool:
        info = await redis.xpending(keys.intents, "dispatch")
        return bool(info["pending"] == 0)

    await wait_for(acknowledged, timeout=10)


async def test_preview_of_a_failing_template_is_a_422_naming_the_field(api: Api) -> None:
    for body, words in (
        ({"text_body": RECURSIVE}, "calls itself too deeply"),
        ({"text_body": "{{ 'x'|center(1000000000) }}"}, "over a limit"),
        ({"text_body": "x", "html_body": "{{ 10.0 ** 400 }}"}, "OverflowError"),
    ):
        status, problem, headers = await api.post("/templates/preview/", body, role="admin")
        assert status == 422, problem
        assert headers["Content-Type"].startswith(PROBLEM)
        field = "html_body" if "html_body" in body else "text_body"
        assert [e["field"] for e in problem["errors"]] == [field]
        assert words in problem["errors"][0]["message"], problem
    status, _ = (await api.get("/healthz", auth=False))[:2]
    assert status == 200


async def test_preview_with_a_million_spaces_in_the_subject_answers(api: Api) -> None:
    """The issue's freeze: a context value of spaces reaching the subject made flattening
    quadratic (30,000 spaces: 5-6 s with no other request served). A million is hours of
    the old regex, past the suite's timeout; the split is one pass."""
    body = {"subject": "{{ s }}x", "text_body": "b", "context": {"s": " " * 999_000}}
    status, shown, _ = await api.post("/templates/preview/", body, role="admin")
    assert status == 200, shown
    assert shown["subject"] == "x"


async def test_a_send_with_a_failing_template_stays_the_callers_422(api: Api) -> None:
    status, _, _ = await api.request(
        "PUT", "/templates/loop/email/", json={"text_body": RECURSIVE, "subject": "s"}, role="admin"
    )
    assert status in (200, 201)
    status, problem, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "email", "recipient": "a@example.com", "template_key": "loop"},
        role="service",
    )
    assert status == 422, problem
    assert "calls itself too deeply" in problem["errors"][0]["message"]


async def test_an_ingested_event_whose_template_recurses_is_dead_lettered_with_the_reason(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Ingestion renders at acceptance: the RecursionError used to escape as a crash of the
    handler (retried, then dead-lettered without the template's reason)."""
    daemon = await daemon_factory()
    async with Api(daemon) as api:
        for key, body in (("loop", RECURSIVE), ("fine", "Hello {{ name }}")):
            status, _, _ = await api.request(
                "PUT", f"/templates/{key}/in_app/", json={"text_body": body}, role="admin"
            )
            assert status == 200
    for event_id, key in (("e-loop", "loop"), ("e-fine", "fine")):
        event = {
            "event_id": event_id,
            "tenant_id": "TEN-0001",
            "type": "t",
            "template_key": key,
            "context": {"name": "Jo"},
            "recipients": [{"user_id": "u-1"}],
            "channels": ["in_app"],
        }
        await redis.xadd("notifyd:events", {"event": orjson.dumps(event)})

    async def dead() -> bool:
        return bool(await redis.xlen("notifyd:dead") == 1)

    await wait_for(dead, timeout=15)
    ((_, letter),) = await redis.xrange("notifyd:dead")
    assert b"calls itself too deeply" in letter[b"reason"]

    async def fine_stored() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM notifications") == 1)

    await wait_for(fine_stored, timeout=15)
