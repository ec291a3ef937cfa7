"""Sandboxed jinja2 rendering of YAML leaves.

Specs and playbooks are parsed as YAML first; every string leaf that contains ``{{`` or
``{%`` is then rendered with a sandboxed, immutable jinja2 environment whose undefined
variables raise (StrictUndefined). A leaf that is a single expression keeps its native
type, so ``rate_mbit: "{{ rate }}"`` yields an integer. Parsing before rendering means a
template can never inject YAML structure, and a playbook stays data, never code.

Templates are expressions only: ``{{ ... }}`` over parameters, literals, operators, tests
and a short list of filters. Statements (``{% for %}``, ``{% macro %}``, ``{% set %}``...)
and calls (``range(...)``, ``x.ljust(...)``, ``cycler``...) are refused before rendering,
and every operator and filter result is bounded, so a hostile playbook can neither read a
file, run a process, loop for hours nor exhaust memory (``'x' * 10**9``, ``9**9**9``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, Undefined, UndefinedError, nodes
from jinja2.filters import FILTERS
from jinja2.nativetypes import NativeCodeGenerator, NativeTemplate, native_concat
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import _PassArg

from testbed.errors import SpecError

MAX_TEMPLATE_CHARS = 2000
MAX_VALUE_SIZE = 100_000  # characters + list items of any intermediate value
MAX_INT_BITS = 10_000  # ~3000 decimal digits, below Python's int-to-str limit
MAX_FILTER_ARG = 10_000  # numeric arguments of filters (widths, counts, precisions)

SAFE_FILTERS = ("abs", "capitalize", "d", "default", "first", "float", "int", "join", "last",
                "length", "count", "list", "lower", "max", "min", "replace", "reverse", "round",
                "sort", "string", "sum", "title", "trim", "unique", "upper")
_EXPRESSION_NODES = (
    nodes.Template, nodes.Output, nodes.TemplateData, nodes.Const, nodes.Name, nodes.Getattr,
    nodes.Getitem, nodes.Slice, nodes.Filter, nodes.Test, nodes.Compare, nodes.Operand,
    nodes.And, nodes.Or, nodes.Not, nodes.Neg, nodes.Pos, nodes.CondExpr, nodes.List,
    nodes.Tuple, nodes.Dict, nodes.Pair, nodes.Keyword, nodes.Concat, nodes.Add, nodes.Sub,
    nodes.Mul, nodes.Div, nodes.FloorDiv, nodes.Mod, nodes.Pow,
)


class _TooBig(SecurityError):
    pass


def _size(value: Any, limit: int = MAX_VALUE_SIZE) -> int:
    """Characters plus items of ``value``, counting shared items each time (stops early)."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v) + 1
        elif isinstance(v, bool):
            total += 1
        elif isinstance(v, int):
            total += 1 + v.bit_length() // 3
        elif isinstance(v, dict):
            total += 1 + len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += 1 + len(v)
            stack.extend(v)
        else:
            total += 1
    return total


def _bounded(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and \
            value.bit_length() > MAX_INT_BITS:
        raise _TooBig(f"a number larger than 2**{MAX_INT_BITS}")
    if _size(value) > MAX_VALUE_SIZE:
        raise _TooBig(f"a value larger than {MAX_VALUE_SIZE} characters or items")
    return value


def _safe_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 2 if _PassArg.from_obj(func) is not None else 1  # environment/context, value

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for arg in (*args[skip:], *kwargs.values()):
            if isinstance(arg, int | float) and not isinstance(arg, bool) and \
                    not -MAX_FILTER_ARG <= arg <= MAX_FILTER_ARG:
                raise _TooBig(f"filter '{name}': argument {arg!r} is too large")
            _bounded(arg)
        if name == "replace" and len(args) > 2 and isinstance(args[skip - 1], str):
            value, old, new = args[skip - 1], str(args[skip]), str(args[skip + 1])
            hits = value.count(old) if old else len(value) + 1
            if len(value) + hits * len(new) > MAX_VALUE_SIZE:
                raise _TooBig(f"filter 'replace' would produce more than {MAX_VALUE_SIZE} "
                              "characters")
        return _bounded(func(*args, **kwargs))

    return wrapper


_PLAIN = (str, int, float, bool, type(None), list, dict)


def _plain_concat(values: Any) -> Any:
    """jinja2's native concat, limited to YAML's kinds of values: it reads its result as a
    Python literal, which would turn the text "..." into Ellipsis (or "1j" into a complex);
    such text stays text."""
    parts = list(values)
    value = native_concat(p for p in parts)  # it chains its head back only onto a generator
    if isinstance(value, _PLAIN):
        return value
    return "".join(str(p) for p in parts)


class _PlainTemplate(NativeTemplate):  # type: ignore[misc]
    def render(self, *args: Any, **kwargs: Any) -> Any:
        # NativeTemplate.render concatenates with NativeEnvironment's concat; use ours.
        ctx = self.new_context(dict(*args, **kwargs))
        return _plain_concat(self.root_render_func(ctx))


class _NativeSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = NativeCodeGenerator
    concat = staticmethod(_plain_concat)  # type: ignore[assignment]
    template_class = _PlainTemplate  # type: ignore[assignment]
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                right > 0 and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise _TooBig(f"{operator}: the result would be larger than 2**{MAX_INT_BITS}")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(times, int) and not isinstance(seq, int | float) and \
                        _size(seq) * max(times, 0) > MAX_VALUE_SIZE:
                    raise _TooBig(f"*: the result would be larger than {MAX_VALUE_SIZE} "
                                  "characters or items")
        if operator == "%" and isinstance(left, str | bytes):
            raise SecurityError("'%' string formatting is not allowed in templates")
        return _bounded(super().call_binop(context, operator, left, right))


_ENV = _NativeSandbox(undefined=StrictUndefined, autoescape=False)
_ENV.globals.clear()  # no range, lipsum, cycler, joiner, namespace, dict
_ENV.filters = {name: _safe_filter(name, FILTERS[name]) for name in SAFE_FILTERS}


def _check_expression(tree: nodes.Template) -> None:
    for node in tree.find_all(nodes.Node):
        if not isinstance(node, _EXPRESSION_NODES):
            what = "statements ({% ... %})" if isinstance(node, nodes.Stmt) else \
                "function and method calls" if isinstance(node, nodes.Call) else \
                f"'{type(node).__name__}'"
            raise SecurityError(f"{what} are not allowed")
        if isinstance(node, nodes.Name) and node.ctx != "load":
            raise SecurityError("assignments are not allowed")
        if isinstance(node, nodes.Filter) and node.name not in _ENV.filters:
            raise SecurityError(f"no filter '{node.name}' (allowed: {', '.join(SAFE_FILTERS)})")


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> Template:
    """Parse, vet and compile once per distinct source (specs repeat the same templates)."""
    tree = _ENV.parse(source)
    _check_expression(tree)
    return _ENV.from_string(tree)


def _is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def render_leaves(data: Any, context: dict[str, Any], file: str, field: str = "") -> Any:
    """Return ``data`` with every templated string leaf rendered against ``context``."""
    if isinstance(data, dict):
        return {
            k: render_leaves(v, context, file, f"{field}.{k}" if field else str(k))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [render_leaves(v, context, file, f"{field}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, str) and _is_template(data):
        if len(data) > MAX_TEMPLATE_CHARS:
            raise SpecError(file, field, f"template longer than {MAX_TEMPLATE_CHARS} characters",
                            "keep templates to short expressions")
        try:
            value = _compile(data).render(**context)
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()
            return _bounded(value)
        except UndefinedError as exc:
            known = ", ".join(sorted(map(str, context))) or "none"
            raise SpecError(file, field, f"template uses an undefined variable: {exc.message}",
                            f"define it under 'params' or with --set; known: {known}") from None
        except SecurityError as exc:
            raise SpecError(file, field, f"template not allowed: {exc}",
                            "templates may only use parameters, literals and filters") from None
        except TemplateError as exc:
            raise SpecError(file, field, f"template error: {exc}",
                            "check the {{ ... }} expression") from None
        except (ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise SpecError(file, field, f"template failed: {exc}"[:300],
                            "check the {{ ... }} expression") from None
        except RecursionError:
            raise SpecError(file, field, "template nested too deeply",
                            "keep templates to short expressions") from None
    return data
