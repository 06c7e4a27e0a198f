"""Rendering notification templates in a sandboxed Jinja2 environment.

Templates are written by tenant admins, so they run in jinja2's sandbox: no attribute
starting with `_`, no `str.format` escapes, no mutation of lists and dicts, bounded `range`,
and every render bounded in steps and characters (`render_bounds.py`: a `{{ "x" * 10**9 }}`,
a `center(10**9)` or nested loops would otherwise eat the daemon's memory or freeze the event
loop every tenant shares). Anything unsafe, over a limit or failing in any other way
(a recursive macro's RecursionError included) is a `TemplateError` with its reason, never a
crash of the caller.

Missing variables are errors (`StrictUndefined`): a notification that would say "Dear ," is
refused at send time with a reason naming the variable, instead of reaching an inbox. Use
`{% if x is defined %}` or `{{ x | default("…") }}` for what is optional. A context value of
`null` is present and renders as an empty string.

HTML bodies are autoescaped (a `<script>` in the context arrives as `&lt;script&gt;`); the
subject and the text body are not (they are not HTML). The rendered subject is always one
line: every run of line breaks and other control characters (`tags.HEADER_UNSAFE`: CR, LF,
\x0b, \x0c, \x85, \u2028, \u2029, every C0 and C1 control but tab), with the whitespace
around it, becomes one space, so no rendered subject can carry a header of its own; and it
is at most 998 characters (RFC 5322's line limit).

How context keys reach a template (keys come from other services and need not be
identifiers; the second seed sends `{"Candidate Name": "John Doe", "Position": …}`):

1. `ctx` is the whole context, so every key works as `{{ ctx["Candidate Name"] }}`.
2. A key that is a valid identifier is also a plain variable: `{{ Position }}`.
3. Every key also gets a slug alias: lowercased, each run of characters other than letters
   and digits replaced by one `_`, leading/trailing `_` stripped (`"Candidate Name"` →
   `candidate_name`, `"Position"` → `position`, `"e-mail"` → `e_mail`). The alias is skipped
   when it is not an identifier (`"1st round"` → `1st_round`), when it is itself a key of the
   context, or when two keys share it; such keys stay reachable through `ctx[...]`.

`ctx` is reserved: a context key named `ctx` is reachable only as `{{ ctx["ctx"] }}`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, cast

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateRuntimeError,
    TemplateSyntaxError,
    pass_context,
)
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.runtime import Context
from jinja2.utils import missing

from notifyd.providers.render_bounds import (
    BoundedEnvironment,
    RenderLimitExceeded,
    RenderLimits,
    budget_of,
    render_bounded,
)
from notifyd.tags import HEADER_UNSAFE

SUBJECT_MAX_LENGTH = 998
_COMPILE_CACHE_SIZE = 512
_TEMPLATE_FILENAME = "<template>"
# How much of an exception's own message a reason quotes.
_REASON_DETAIL_MAX = 200

# Runs of line breaks and other control characters (tags.HEADER_UNSAFE): a subject is split
# at them, with no `\s*` around the class: `\s*[…]+\s*` backtracked over every run of
# spaces it failed on, quadratic in the run's length (seconds for a long run of spaces).
_HEADER_UNSAFE_RUNS = re.compile(HEADER_UNSAFE.pattern + "+")
_NOT_ALNUM = re.compile(r"[\W_]+")


class TemplateError(Exception):
    """A template that cannot be rendered; `reason` is meant for the caller to read.

    `field` names what is at fault: the source field (`subject`, `text_body`, `html_body`)
    for a syntax error or an unsafe construct, `context` for a missing variable,
    `template_key` when there is no template at all. `line` is the template line, when known.
    """

    def __init__(self, reason: str, *, field: str = "context", line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.line = line


@dataclass(frozen=True)
class TemplateSource:
    """The template text as stored; `locale` is the stored row's locale, None for a built-in."""

    subject: str | None
    text_body: str
    html_body: str | None
    locale: str | None = None


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Rendered:
    subject: str | None
    text: str
    html: str | None


class _MissingVariable(UndefinedError):
    """An undefined value was used; carries the name so no one has to parse the message."""

    def __init__(self, message: str | None = None, *, name: Any, top_level: bool) -> None:
        super().__init__(message)
        self.name = name
        self.top_level = top_level


class _StrictUndefined(StrictUndefined):
    """StrictUndefined whose plain "undefined" failures raise `_MissingVariable`.

    The exception class is swapped in the constructor (not by overriding the failing method)
    because jinja binds every dunder of `Undefined` to that method at class creation.
    Other exception kinds (the sandbox's SecurityError for unsafe attributes) are kept.
    """

    __slots__ = ()

    def __init__(
        self,
        hint: str | None = None,
        obj: Any = missing,
        name: str | None = None,
        exc: type[TemplateRuntimeError] = UndefinedError,
    ) -> None:
        if exc is UndefinedError:
            exc = cast(
                type[TemplateRuntimeError],
                functools.partial(_MissingVariable, name=name, top_level=obj is missing),
            )
        super().__init__(hint, obj, name, exc)


@pass_context
def _finalize(context: Context, value: Any) -> Any:
    """`null` in the context is a present, empty value (not the word "None"); every value
    printed is charged to the render's budget before it becomes a string."""
    if value is None:
        return ""
    budget = budget_of(context)
    budget.build(len(value) if type(value) is str else budget.measure(value))
    return value


@functools.lru_cache(maxsize=8)
def _environments(limits: RenderLimits) -> tuple[BoundedEnvironment, BoundedEnvironment]:
    """The plain and the HTML (autoescaping) environment for `limits` (one pair per daemon)."""
    return _environment(limits, autoescape=False), _environment(limits, autoescape=True)


def _environment(limits: RenderLimits, *, autoescape: bool) -> BoundedEnvironment:
    return BoundedEnvironment(
        limits,
        undefined=_StrictUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
    )


@functools.lru_cache(maxsize=_COMPILE_CACHE_SIZE)
def _compile(source: str, html: bool, limits: RenderLimits) -> Template:
    """Compile once per distinct source text; rendering is then cheap on the hot path."""
    plain, escaping = _environments(limits)
    return (escaping if html else plain).from_string(source)


def slug(key: str) -> str:
    """The alias of a context key: lowercase, runs of non-alphanumerics → `_`, stripped."""
    return _NOT_ALNUM.sub("_", key.lower()).strip("_")


def template_variables(context: Mapping[str, Any]) -> dict[str, Any]:
    """The names a template sees for `context` (see the module docstring for the rules)."""
    claimed: dict[str, list[str]] = {}
    for key in context:
        alias = slug(key)
        if alias != key:
            claimed.setdefault(alias, []).append(key)
    variables: dict[str, Any] = {}
    for alias, keys in claimed.items():
        if len(keys) == 1 and alias.isidentifier() and alias not in context:
            variables[alias] = context[keys[0]]
    for key, value in context.items():
        if key.isidentifier():
            variables[key] = value
    variables["ctx"] = dict(context)
    return variables


def _template_line(tb: TracebackType | None) -> int | None:
    """The innermost template line in a traceback jinja has rewritten to template lines."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _at(field: str, line: int | None) -> str:
    return f"{field} line {line}" if line is not None else field


def _compile_field(
    source: str, *, html: bool, field: str, name: str, limits: RenderLimits
) -> Template:
    try:
        return _compile(source, html, limits)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"{name}: {_at(field, exc.lineno)}: {exc.message}", field=field, line=exc.lineno
        ) from None
    except RecursionError:
        raise TemplateError(f"{name}: {field}: nested too deeply", field=field) from None
    except Exception as exc:  # a source jinja or Python cannot compile, however it fails
        raise TemplateError(f"{name}: {field}: {_brief(exc)}", field=field) from None


def _brief(exc: BaseException) -> str:
    """An exception as a reason: its type and the start of its message (which may quote a
    value of any size)."""
    text = str(exc)
    if len(text) > _REASON_DETAIL_MAX:
        text = text[:_REASON_DETAIL_MAX] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(exc: Exception, *, field: str, name: str) -> NoReturn:
    line = _template_line(exc.__traceback__)
    where = _at(field, line)
    if isinstance(exc, _MissingVariable):
        if exc.top_level:
            reason = f"{name} needs {exc.name!r}, which the context does not have ({where})"
        else:
            reason = f"{name} needs {exc.name!r} of a value that does not have it ({where}): {exc}"
        raise TemplateError(reason, field="context", line=line) from None
    if isinstance(exc, RenderLimitExceeded):
        raise TemplateError(
            f"{name}: {where}: over a limit: {exc}", field=field, line=line
        ) from None
    if isinstance(exc, SecurityError):
        raise TemplateError(
            f"{name}: {where}: not allowed in a template: {exc}", field=field, line=line
        ) from None
    if isinstance(exc, RecursionError):
        raise TemplateError(
            f"{name}: {where}: calls itself too deeply (a macro without an end to its recursion?)",
            field=field,
            line=line,
        ) from None
    if isinstance(exc, MemoryError):
        raise TemplateError(
            f"{name}: {where}: runs out of memory", field=field, line=line
        ) from None
    raise TemplateError(f"{name}: {where} fails: {_brief(exc)}", field=field, line=line) from None


def _render_field(
    source: str,
    variables: Mapping[str, Any],
    *,
    html: bool,
    field: str,
    name: str,
    limits: RenderLimits,
) -> str:
    template = _compile_field(source, html=html, field=field, name=name, limits=limits)
    try:
        return render_bounded(template, variables)
    except Exception as exc:  # whatever a tenant's template raises is that template's failure
        _fail(exc, field=field, name=name)


def one_line_subject(subject: str) -> str:
    """Every run of line breaks and control characters, with the whitespace around it,
    collapsed to one space (no header injection), capped at 998 characters. One pass of a
    split and a strip per part: linear in the subject's length."""
    parts = (part.strip() for part in _HEADER_UNSAFE_RUNS.split(subject))
    return " ".join(part for part in parts if part)[:SUBJECT_MAX_LENGTH]


def render(
    source: TemplateSource,
    context: Mapping[str, Any],
    *,
    limits: RenderLimits,
    name: str = "template",
) -> Rendered:
    """Render every part of `source` with `context`; `name` prefixes every error reason.

    Each part renders within `limits` (NOTIFYD_TEMPLATE_MAX_OUTPUT / _MAX_STEPS). Raises
    `TemplateError` for a syntax error, a missing variable, an unsafe construct, a limit
    exceeded, or any other failure of the template (RecursionError, MemoryError, …).
    """
    if not isinstance(context, Mapping) or not all(isinstance(k, str) for k in context):
        raise TemplateError(f"{name}: the context must be a JSON object", field="context")
    variables = template_variables(context)
    subject = None
    if source.subject is not None:
        subject = one_line_subject(
            _render_field(
                source.subject, variables, html=False, field="subject", name=name, limits=limits
            )
        )
    text = _render_field(
        source.text_body, variables, html=False, field="text_body", name=name, limits=limits
    )
    html = None
    if source.html_body is not None:
        html = _render_field(
            source.html_body, variables, html=True, field="html_body", name=name, limits=limits
        )
    return Rendered(subject=subject, text=text, html=html)


def check(
    source: TemplateSource, *, limits: RenderLimits, name: str = "template"
) -> list[TemplateError]:
    """Every syntax error in `source`, one per field, without rendering anything."""
    errors: list[TemplateError] = []
    parts = (
        ("subject", source.subject, False),
        ("text_body", source.text_body, False),
        ("html_body", source.html_body, True),
    )
    for field, text, html in parts:
        if text is None:
            continue
        try:
            _compile_field(text, html=html, field=field, name=name, limits=limits)
        except TemplateError as exc:
            errors.append(exc)
    return errors
