"""Rendering notification templates in a sandboxed Jinja2 environment.

Templates are written by tenant admins, so they run in jinja2's `SandboxedEnvironment`: no
attribute starting with `_`, no `str.format` escapes, bounded `range`, and here also bounded
`*` / `**` (a `{{ "x" * 10**9 }}` would otherwise eat the daemon's memory). Anything unsafe is
a `TemplateError`, never a crash.

Missing variables are errors (`StrictUndefined`): a notification that would say "Dear ," is
refused at send time with a reason naming the variable, instead of reaching an inbox. Use
`{% if x is defined %}` or `{{ x | default("…") }}` for what is optional. A context value of
`null` is present and renders as an empty string.

HTML bodies are autoescaped (a `<script>` in the context arrives as `&lt;script&gt;`); the
subject and the text body are not (they are not HTML). The rendered subject is always one
line (CR/LF and other line breaks become a space: no header injection) and at most 998
characters (RFC 5322's line limit).

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

from jinja2 import StrictUndefined, Template, TemplateRuntimeError, TemplateSyntaxError
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import missing

SUBJECT_MAX_LENGTH = 998
# Largest string or list a template may build with `*`, and largest integer power it may take.
_MAX_REPEAT = 100_000
_MAX_POWER_BITS = 4_096
_COMPILE_CACHE_SIZE = 512
_TEMPLATE_FILENAME = "<template>"

# Line breaks and other control characters: none belongs in a mail header.
_LINE_BREAKS = re.compile(r"\s*[\x00-\x08\n-\x1f\x7f\x85\u2028\u2029]+\s*")
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


class _Environment(SandboxedEnvironment):
    """The sandbox, plus limits on the two operators that can allocate without bound."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | bytes | list | tuple)
                    and isinstance(times, int)
                    and len(seq) * times > _MAX_REPEAT
                ):
                    raise SecurityError(f"a repetition longer than {_MAX_REPEAT} is not allowed")
        elif (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * max(abs(left).bit_length(), 1) > _MAX_POWER_BITS
        ):
            raise SecurityError(f"a power larger than 2**{_MAX_POWER_BITS} is not allowed")
        return super().call_binop(context, operator, left, right)


def _finalize(value: Any) -> Any:
    """`null` in the context is a present, empty value (not the word "None")."""
    return "" if value is None else value


def _environment(autoescape: bool) -> _Environment:
    return _Environment(
        undefined=_StrictUndefined,
        autoescape=autoescape,
        finalize=_finalize,
        keep_trailing_newline=True,
        auto_reload=False,
    )


_PLAIN = _environment(autoescape=False)
_HTML = _environment(autoescape=True)


@functools.lru_cache(maxsize=_COMPILE_CACHE_SIZE)
def _compile(source: str, html: bool) -> Template:
    """Compile once per distinct source text; rendering is then cheap on the hot path."""
    return (_HTML if html else _PLAIN).from_string(source)


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


def _compile_field(source: str, *, html: bool, field: str, name: str) -> Template:
    try:
        return _compile(source, html)
    except TemplateSyntaxError as exc:
        raise TemplateError(
            f"{name}: {_at(field, exc.lineno)}: {exc.message}", field=field, line=exc.lineno
        ) from None


def _fail(exc: Exception, *, field: str, name: str) -> NoReturn:
    line = _template_line(exc.__traceback__)
    where = _at(field, line)
    if isinstance(exc, _MissingVariable):
        if exc.top_level:
            reason = f"{name} needs {exc.name!r}, which the context does not have ({where})"
        else:
            reason = f"{name} needs {exc.name!r} of a value that does not have it ({where}): {exc}"
        raise TemplateError(reason, field="context", line=line) from None
    if isinstance(exc, SecurityError):
        raise TemplateError(
            f"{name}: {where}: not allowed in a template: {exc}", field=field, line=line
        ) from None
    raise TemplateError(
        f"{name}: {where} fails: {type(exc).__name__}: {exc}", field=field, line=line
    ) from None


def _render_field(
    source: str, variables: Mapping[str, Any], *, html: bool, field: str, name: str
) -> str:
    template = _compile_field(source, html=html, field=field, name=name)
    try:
        return template.render(variables)
    except (TemplateRuntimeError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        _fail(exc, field=field, name=name)


def one_line_subject(subject: str) -> str:
    """Line breaks collapsed to a space (no header injection), capped at 998 characters."""
    return _LINE_BREAKS.sub(" ", subject).strip()[:SUBJECT_MAX_LENGTH]


def render(
    source: TemplateSource, context: Mapping[str, Any], *, name: str = "template"
) -> Rendered:
    """Render every part of `source` with `context`; `name` prefixes every error reason.

    Raises `TemplateError` for a syntax error, a missing variable or an unsafe construct.
    """
    variables = template_variables(context)
    subject = None
    if source.subject is not None:
        subject = one_line_subject(
            _render_field(source.subject, variables, html=False, field="subject", name=name)
        )
    text = _render_field(source.text_body, variables, html=False, field="text_body", name=name)
    html = None
    if source.html_body is not None:
        html = _render_field(source.html_body, variables, html=True, field="html_body", name=name)
    return Rendered(subject=subject, text=text, html=html)


def check(source: TemplateSource, *, name: str = "template") -> list[TemplateError]:
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
            _compile_field(text, html=html, field=field, name=name)
        except TemplateError as exc:
            errors.append(exc)
    return errors
