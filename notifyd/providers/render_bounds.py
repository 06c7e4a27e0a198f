"""What one render of a tenant's template may cost: a budget of steps and of characters.

Templates are written by tenants, and render on the event loop every tenant shares, so a
template must not be able to spend more than a fixed amount of CPU or memory. The bound is
counted, not timed (no signal, no clock: the same template fails the same way on every
machine, and nothing interrupts the loop from outside). Each field of a notification
(subject, text, HTML) renders with a fresh `Budget`:

- **steps** (`RenderLimits.max_steps`, NOTIFYD_TEMPLATE_MAX_STEPS): every loop iteration
  (elements a `{% for … if … %}` skips count too, and a `recursive` loop's every level), every
  call (a macro, a method, a global), and every element a filter walks or an output value
  is measured by. Jinja has no other way to repeat work: without loops and calls a
  template runs straight through, in time bounded by its own length, so counting these
  bounds the whole render (a recursive macro that calls itself twice per level is refused
  at its budget, long before its 2**depth calls; one that recurses deeper than Python's
  stack raises RecursionError, which render.py turns into a TemplateError).
- **characters** (`RenderLimits.max_output`, NOTIFYD_TEMPLATE_MAX_OUTPUT): the field's output,
  and, counted separately against four times as much (`BUILT_PER_OUTPUT`), every string its
  expressions build on the way (each `{{ }}` value, each filter's, operator's and method's
  result: `{{ body|upper }}` counts the body twice, so the allowance is a multiple). Where a
  string's size is known before it is built (`center(N)`, `indent`, `wordwrap`, `"%*s"`,
  `"{:>N}"`, `*`, `+`, `~`, `join`, `replace`, `str.ljust`, `int.to_bytes`, …) it is refused
  before the allocation; a container is measured (a bounded walk, its elements charged as
  steps) before it is turned into a string.

jinja2's sandbox is the base (`ImmutableSandboxedEnvironment`: no `_` attributes, no
mutation of lists and dicts, which would let `l.extend(l)` double a list per step); the
hooks it offers are used as they are meant to be: `call` and `call_binop` (every call and
the intercepted operators), `wrap_str_format` (str.format), the `filters` mapping, the
`context_class` (which carries the budget, shared with derived contexts) and the
`code_generator_class` (a tick per loop iteration, `~` through a measured join). The
`lipsum` global is removed (it builds up to thousands of words per call for nothing a
notification needs). `range` keeps the sandbox's cap of 100,000 per range; what loops over
it is counted here.

Reading costs steps too: a comparison, an `in` or a slice of a long string or list (a pass
over it, or a copy) is charged a step per 1,000 characters or 100 elements, so a loop
comparing a megabyte of context on every iteration runs out of steps, not of time; so does a
method of a long string (`count`, `split`, …) or a test (`is in`), and a list or dict a
filter or a method builds costs a step per element.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame, operators, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, Undefined, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Namespace, _PassArg  # _PassArg: how jinja calls a filter
from markupsafe import EscapeFormatter, Markup, soft_str

# What a field's expressions may build on the way, per character of output it may have: a
# value printed is counted once built and once printed, a filtered one once more.
BUILT_PER_OUTPUT = 4
# Largest string or list a template may build with `*`, and largest integer an operator may make.
MAX_REPEAT = 100_000
MAX_INT_BITS = 4_096
# What an object that is neither a string, a number nor a container prints as, at most
# (a macro, a loop, a cycler: their repr is short).
_OTHER_REPR = 100
# A width or precision of printf-style `%` formatting: `%-10.3f`, `%(name)*s`.
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
# The width and precision of a `str.format` spec: `>1000`, `0=+#30,.2f`.
_FORMAT_SPEC = re.compile(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?")
_WORD = re.compile(r"\S+")
# What a comparison, `in` or slice may read per step: a pass over a string is cheap per
# character, a pass over a list costs a Python comparison per element.
READ_CHARS_PER_STEP = 1_000
READ_ITEMS_PER_STEP = 100


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """NOTIFYD_TEMPLATE_MAX_OUTPUT and NOTIFYD_TEMPLATE_MAX_STEPS, per rendered field."""

    max_output: int = 1_000_000
    max_steps: int = 100_000


class RenderLimitExceeded(SecurityError):
    """A render went over one of its limits; the message says which, for the tenant to read."""


class Budget:
    """What is left of one field's render; every charge checks before the work is done."""

    __slots__ = ("built", "limits", "max_built", "output", "steps")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.max_built = limits.max_output * BUILT_PER_OUTPUT
        self.steps = 0
        self.built = 0
        self.output = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            self._too_many()

    def _too_many(self) -> NoReturn:
        raise RenderLimitExceeded(
            f"the template takes more than {self.limits.max_steps} steps "
            "(loop iterations, calls, elements walked and long values read)"
        )

    def left(self) -> int:
        """Characters a render may still build."""
        return self.max_built - self.built

    def check(self, n: int, what: str) -> None:
        """Refuses to build `n` characters (`what` says what would have built them)."""
        if n > self.left():
            self._too_large(what)

    def build(self, n: int, what: str = "its values") -> None:
        if self.built + n > self.max_built:
            self._too_large(what)
        self.built += n

    def emit(self, n: int) -> None:
        self.output += n
        if self.output > self.limits.max_output:
            raise RenderLimitExceeded(
                f"the output is longer than {self.limits.max_output} characters"
            )

    def _too_large(self, what: str) -> NoReturn:
        raise RenderLimitExceeded(
            f"{what} would build more than the {self.max_built} characters a template may build"
        )

    def measure(self, value: Any, *, indent: int = 0, what: str = "a value") -> int:
        """An upper bound of the characters `value` prints as (str(), repr of its elements,
        JSON with `indent`), found by a walk that stops once it exceeds what is left;
        each element walked is a step."""
        left = self.left()
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            # the usual ones, without the walk
            total = (
                len(value) + 2
                if kind is str
                else value.bit_length() // 3 + 4
                if kind is int
                else 26
            )
            if total > left:
                self._too_large(what)
            return total
        total = 0
        stack: list[tuple[Any, int]] = [(value, 0)]
        while stack:
            item, depth = stack.pop()
            total += 2 + indent * depth
            if isinstance(item, str | bytes):
                total += len(item)
            elif isinstance(item, Undefined) or item is None or isinstance(item, bool):
                pass
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 2
            elif isinstance(item, float):
                total += 24
            elif isinstance(item, Namespace):  # prints as the dict of its attributes
                stack.append((item._Namespace__attrs, depth))
            elif isinstance(item, Mapping):
                self.step(len(item))
                for key, element in item.items():
                    stack.append((key, depth + 1))
                    stack.append((element, depth + 1))
            elif isinstance(item, range):
                total += 40
            elif isinstance(item, Collection):  # lists, tuples, sets, dict views…
                self.step(len(item))
                stack.extend((element, depth + 1) for element in item)
            else:
                total += _OTHER_REPR
            if total > left:
                self._too_large(what)
        return total


class _BudgetContext(Context):
    """A render's context, carrying its budget; a derived context (a scoped block) shares it."""

    budget: Budget

    def __init__(self, environment: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(environment, *args, **kwargs)
        self.budget = Budget(environment.limits)

    def derived(self, locals: dict[str, Any] | None = None) -> Context:
        context = super().derived(locals)
        if isinstance(context, _BudgetContext):
            context.budget = self.budget
        return context


def budget_of(context: Context) -> Budget:
    """The budget of a render of a `BoundedEnvironment` (whose contexts all carry one)."""
    budget: Budget = context.budget  # type: ignore[attr-defined]
    return budget


class _CodeGenerator(CodeGenerator):
    """jinja's code generator, with a step per loop iteration and `~` through a measured join.

    jinja allows no custom node types, so the step is written around what `visit_For`
    visits: first in the loop's body (every iteration, every level of a recursive loop) or,
    when the loop has a filter, first in the filter's test (every element taken, kept or not).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted: set[int] = set()  # ids of the loop bodies and tests that step

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._counted.add(id(node.body) if node.test is None else id(node.test))
        super().visit_For(node, frame)

    def blockvisit(self, nodes: Iterable[nodes.Node], frame: Frame) -> None:
        if id(nodes) in self._counted:
            self.writeline("environment.tick(context)")
        super().blockvisit(nodes, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._counted:
            return super().visit(node, *args, **kwargs)
        self.write("(environment.tick(context) and ")
        result = super().visit(node, *args, **kwargs)
        self.write(")")
        return result

    @optimizeconst
    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("(environment.read(context, ")
        self.visit(node.expr, frame)
        self.write(")")
        for op in node.ops:
            self.visit(op, frame)
        self.write(")")

    def visit_Operand(self, node: nodes.Operand, frame: Frame) -> None:
        self.write(f" {operators[node.op]} environment.read(context, ")
        self.visit(node.expr, frame)
        self.write(")")

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.read(context, ")  # a slice copies up to all of it
        self.visit(node.node, frame)
        self.write(")[")
        self.visit(node.arg, frame)
        self.write("]")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write("environment.bounded_join(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {markup})")


class _BoundedFormatter(SandboxedFormatter):
    """str.format whose fields' widths and precisions together stay within `left` characters."""

    def __init__(self, env: Any, left: int, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._left = left

    def format_field(self, value: Any, format_spec: str) -> Any:
        match = _FORMAT_SPEC.match(format_spec)
        width = sum(int(g) for g in match.groups() if g) if match else 0
        self._left -= width
        if self._left < 0:
            raise RenderLimitExceeded(
                f"a format width of {width} would build more than the characters "
                "a template may build"
            )
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


def _arg(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any
) -> Any:
    """A filter's or method's argument, given by position or by name."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _width(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if isinstance(value, str) else 0


@functools.lru_cache(maxsize=256)
def _percent_widths(template: str) -> int:
    """The widths and precisions of a printf-style template, added up (-1: a `*` one)."""
    widths = 0
    for match in _PERCENT_SPEC.finditer(template):
        for group in match.group(1, 2):
            if group == "*":
                return -1
            if group:
                widths += int(group)
    return widths


def _percent_cost(budget: Budget, template: str, values: Any) -> None:
    """Refuses a printf-style `%` whose widths and values would build too much."""
    widths = (
        _percent_widths(template)
        if len(template) <= 1000
        else _percent_widths.__wrapped__(template)
    )
    if widths < 0:
        raise RenderLimitExceeded("a `*` width or precision is not allowed; write it")
    if type(values) is tuple:  # `|format(a, b)`: measured one by one, without the walk
        size = sum(budget.measure(value, what="`%`") for value in values)
    else:
        size = budget.measure(values, what="`%`")
    budget.build(len(template) + widths + size, "`%` formatting")


def _replace_cost(budget: Budget, text: str, old: Any, new: Any, count: Any) -> None:
    if not isinstance(old, str) or not isinstance(new, str):
        return
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    budget.check(len(text) + found * len(new), "replace")


def _join_cost(budget: Budget, separator: Any, items: Any) -> None:
    if isinstance(items, list | tuple | set | frozenset | Mapping):
        size = budget.measure(list(items), what="join")
        budget.check(size + _width(separator) * max(len(items) - 1, 0), "join")


# Filters that print their whole value as a string: the value is measured first.
_STRINGIFYING = frozenset(
    [
        "capitalize",
        "center",
        "e",
        "escape",
        "forceescape",
        "format",
        "indent",
        "lower",
        "pprint",
        "replace",
        "safe",
        "string",
        "striptags",
        "title",
        "trim",
        "truncate",
        "upper",
        "urlencode",
        "urlize",
        "wordcount",
        "wordwrap",
        "tojson",
        "xmlattr",
        "reverse",
    ]
)


def _check_center(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    budget.check(max(_width(_arg(args, kw, 0, "width", 80)), len(soft_str(value))), "center")


def _check_indent(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    text = soft_str(value)
    pad = _width(_arg(args, kw, 0, "width", 4))
    budget.check(len(text) + pad * (text.count("\n") + 1), "indent")


def _check_wordwrap(
    budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]
) -> None:
    text = soft_str(value)
    width = _arg(args, kw, 0, "width", 79)
    width = width if isinstance(width, int) and width > 0 else 1
    wrap = _width(_arg(args, kw, 2, "wrapstring", None) or "\n")
    lines = 2 * len(text) // width + 1
    budget.step(len(text) // width + 1)
    # textwrap breaks a long word by copying what is left of it at every line: quadratic
    longest = max((len(m.group()) for m in _WORD.finditer(text)), default=0)
    budget.check(len(text) + lines * wrap + longest * longest // (2 * width), "wordwrap")


def _check_format(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    _percent_cost(budget, soft_str(value), kw or args)


def _check_join(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    _join_cost(budget, _arg(args, kw, 0, "d", ""), value)


def _check_replace(
    budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]
) -> None:
    _replace_cost(
        budget,
        soft_str(value),
        _arg(args, kw, 0, "old", None),
        _arg(args, kw, 1, "new", None),
        _arg(args, kw, 2, "count", None),
    )


def _check_batch(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    count = _arg(args, kw, 0, "linecount", 0)
    if isinstance(count, int) and _arg(args, kw, 1, "fill_with", None) is not None:
        budget.step(max(count, 0))


def _check_slice(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    count = _arg(args, kw, 0, "slices", 0)
    if isinstance(count, int):
        budget.step(max(count, 0))


def _check_sum(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    start = _arg(args, kw, 1, "start", 0)
    if not isinstance(start, int | float):
        raise RenderLimitExceeded("sum adds numbers only (use join for strings)")


def _check_tojson(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    indent = _arg(args, kw, 0, "indent", None)
    budget.measure(value, indent=_width(indent), what="tojson")


def _check_pprint(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    budget.measure(value, indent=1, what="pprint")


def _check_urlize(budget: Budget, value: Any, args: tuple[Any, ...], kw: Mapping[str, Any]) -> None:
    text = soft_str(value)
    extra = _width(_arg(args, kw, 3, "target", None)) + _width(_arg(args, kw, 4, "rel", None))
    words = len(text.split())
    budget.step(words)
    budget.check(2 * len(text) + words * (extra + 64), "urlize")


_Check = Callable[[Budget, Any, tuple[Any, ...], Mapping[str, Any]], None]
_FILTER_CHECKS: dict[str, _Check] = {
    "center": _check_center,
    "indent": _check_indent,
    "wordwrap": _check_wordwrap,
    "format": _check_format,
    "join": _check_join,
    "replace": _check_replace,
    "batch": _check_batch,
    "slice": _check_slice,
    "sum": _check_sum,
    "tojson": _check_tojson,
    "pprint": _check_pprint,
    "urlize": _check_urlize,
}


def _cost(value: Any) -> int:
    """Steps of walking `value`: an element each, a long string a step per
    READ_CHARS_PER_STEP characters."""
    if type(value) is str:
        return len(value) // READ_CHARS_PER_STEP
    if isinstance(value, Undefined):
        return 0
    if isinstance(value, str | bytes):
        return len(value) // READ_CHARS_PER_STEP
    try:
        return len(value)
    except TypeError:
        return 0


def _charge_result(budget: Budget, result: Any, what: str) -> None:
    """A string built is counted in characters, a list or dict built in steps."""
    if type(result) is str or isinstance(result, str | bytes):
        budget.build(len(result), what)
    elif isinstance(result, list | tuple | dict | set):
        budget.step(len(result))


# Filters that neither walk their value nor build anything larger than it: left as they are
# (`default` stands six times at the top of every built-in template).
_CONSTANT_TIME = frozenset({"default", "d", "length", "count", "abs", "round", "attr"})


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` charged to the render's budget: a step per element of its value, the value
    measured first when the filter prints it, its own check, and the string it returns."""
    if name in _CONSTANT_TIME:
        return func
    pass_arg = _PassArg.from_obj(func)
    check = _FILTER_CHECKS.get(name)
    stringifies = name in _STRINGIFYING

    @pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget: Budget = context.budget  # type: ignore[attr-defined]
        budget.step(1 + _cost(value))
        if stringifies and type(value) is not str and not isinstance(value, str | Undefined):
            budget.measure(value, what=name)
        if check is not None and not isinstance(value, Undefined):
            check(budget, value, args, kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        _charge_result(budget, result, name)
        return result

    bounded.__name__ = name
    return bounded


def _bounded_test(func: Any) -> Callable[..., Any]:
    """A test (`is in`, `is sameas`, …) charged for what it may read of its value and
    arguments (`x is in long` scans `long`), as a comparison is."""
    pass_arg = _PassArg.from_obj(func)

    @pass_context
    def bounded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget_of(context).step(1 + _cost(value) + sum(_cost(a) for a in args))
        if pass_arg is _PassArg.context:
            return func(context, value, *args, **kwargs)
        if pass_arg is _PassArg.eval_context:
            return func(context.eval_ctx, value, *args, **kwargs)
        if pass_arg is _PassArg.environment:
            return func(context.environment, value, *args, **kwargs)
        return func(value, *args, **kwargs)

    bounded.__name__ = func.__name__
    return bounded


def _check_method(
    budget: Budget, method: Any, args: tuple[Any, ...], kw: Mapping[str, Any]
) -> None:
    """Refuses a method call on a string or an integer whose result would be too large."""
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "")
    if isinstance(owner, str | bytes):
        if name in ("center", "ljust", "rjust", "zfill"):
            budget.check(_width(_arg(args, kw, 0, "width", 0)), f"str.{name}")
        elif name == "expandtabs":
            size = _width(_arg(args, kw, 0, "tabsize", 8))
            tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
            budget.check(len(owner) + tabs * size, "str.expandtabs")
        elif name == "replace" and isinstance(owner, str):
            _replace_cost(
                budget,
                owner,
                _arg(args, kw, 0, "old", None),
                _arg(args, kw, 1, "new", None),
                _arg(args, kw, 2, "count", None),
            )
        elif name == "join":
            _join_cost(budget, owner, _arg(args, kw, 0, "iterable", None))
        elif name == "translate":
            raise RenderLimitExceeded("str.translate is not allowed in a template")
    elif isinstance(owner, int) and name == "to_bytes":
        budget.check(_width(_arg(args, kw, 0, "length", 1)), "int.to_bytes")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every render charged to a `Budget` of `limits`."""

    code_generator_class = _CodeGenerator
    context_class = _BudgetContext
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(**options)
        self.limits = limits
        self.globals.pop("lipsum", None)
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _bounded_test(f) for name, f in self.tests.items()}

    def read(self, context: Context, value: Any) -> Any:
        """`value`, about to be compared, searched (`in`) or sliced: a long string or list
        costs a step per READ_CHARS_PER_STEP characters or READ_ITEMS_PER_STEP elements."""
        if type(value) is str:
            if len(value) >= READ_CHARS_PER_STEP:
                budget_of(context).step(len(value) // READ_CHARS_PER_STEP)
        elif isinstance(value, str | bytes):
            budget_of(context).step(len(value) // READ_CHARS_PER_STEP)
        elif isinstance(value, list | tuple):
            budget_of(context).step(len(value) // READ_ITEMS_PER_STEP)
        return value

    def tick(self, context: Context) -> bool:
        """One step of a loop; true, so it can stand first in a loop filter's test."""
        budget_of(context).step()
        return True

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = budget_of(__context)
        owner = getattr(__obj, "__self__", None)
        budget.step(1 + (_cost(owner) if isinstance(owner, str | bytes) else 0))
        _check_method(budget, __obj, args, kwargs)
        if getattr(__obj, "prints_its_arguments", False):  # str.format: measured first
            for value in (*args, *kwargs.values()):
                budget.check(budget.measure(value, what="str.format"), "str.format")
        result = super().call(__context, __obj, *args, **kwargs)
        _charge_result(budget, result, "a call")
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = budget_of(context)
        if operator == "*":
            _check_repeat(budget, left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            if isinstance(left, str) and isinstance(right, str):
                budget.build(len(left) + len(right), "`+`")
            elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
                budget.step(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _percent_cost(budget, left, right)
        return super().call_binop(context, operator, left, right)

    def bounded_join(self, context: Context, values: tuple[Any, ...], markup: bool) -> str:
        """`a ~ b ~ c`: every part measured before the string is built."""
        budget = budget_of(context)
        size = 0
        for value in values:
            size += len(value) if type(value) is str else budget.measure(value, what="`~`")
        budget.build(size, "`~`")
        return str(markup_join(values) if markup else str_join(values))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format / format_map through a formatter that counts its fields' widths."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        owner: str = value.__self__
        formatter: SandboxedFormatter
        if isinstance(owner, Markup):
            formatter = _BoundedEscapeFormatter(self, self.limits.max_output, escape=owner.escape)
        else:
            formatter = _BoundedFormatter(self, self.limits.max_output)
        as_map = value.__name__ == "format_map"

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if as_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return type(owner)(formatter.vformat(owner, args, kwargs))  # Markup stays Markup

        bounded_format.__name__ = value.__name__
        bounded_format.prints_its_arguments = True  # type: ignore[attr-defined]
        return bounded_format


def _check_repeat(budget: Budget, left: Any, right: Any) -> None:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | bytes | list | tuple) and isinstance(times, int):
            size = len(seq) * times
            if size > MAX_REPEAT:
                raise RenderLimitExceeded(f"a repetition longer than {MAX_REPEAT} is not allowed")
            if isinstance(seq, str | bytes):
                budget.build(size, "`*`")
            else:
                budget.step(max(size, 0))
            return
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS
    ):
        raise RenderLimitExceeded(f"a product larger than 2**{MAX_INT_BITS} is not allowed")


def _check_power(left: Any, right: Any) -> None:
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and abs(left) > 1
        and right * max(abs(left).bit_length(), 1) > MAX_INT_BITS
    ):
        raise RenderLimitExceeded(f"a power larger than 2**{MAX_INT_BITS} is not allowed")


def render_bounded(template: Any, variables: Mapping[str, Any]) -> str:
    """`template.render(variables)`, the output counted chunk by chunk as it is generated,
    so a loop that prints stops at the limit instead of after it. Errors come out as
    `Template.render` raises them (the traceback rewritten to template lines)."""
    context = template.new_context(dict(variables))
    budget = budget_of(context)
    parts: list[str] = []
    limit = budget.limits.max_output
    size = 0
    try:
        for chunk in template.root_render_func(context):
            size += len(chunk)
            if size > limit:
                budget.emit(size)
            parts.append(chunk)
    except Exception:
        template.environment.handle_exception()
    return "".join(parts)


__all__ = [
    "MAX_INT_BITS",
    "MAX_REPEAT",
    "BoundedEnvironment",
    "Budget",
    "RenderLimitExceeded",
    "RenderLimits",
    "budget_of",
    "render_bounded",
]
