"""Small typed accessors for validating parsed YAML, each failing with a SpecError that
names the file, the field and the fix."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

from testbed.errors import SpecError

# \Z, not $: "$" also matches before a trailing newline, which would let "name\n" through.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}\Z")
# A YAML document may use aliases (&a / *a): they are counted each time they are reached,
# so a "billion laughs" document or a self-referencing alias is refused, not expanded.
MAX_DEPTH = 32
MAX_VALUES = 100_000
# libyaml's parser is ten times faster than the pure-Python one (and bounds nesting itself);
# both build plain data with the safe constructor.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, file: str) -> Any:
    """Parse ``text`` with the safe loader; any failure, an over-deep nesting or an alias
    bomb is a SpecError naming ``file``."""
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)  # a safe loader
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise SpecError(file, "(syntax)", f"not valid YAML: {first}"[:300],
                        "fix the YAML syntax") from None
    except RecursionError:
        raise SpecError(file, "(syntax)", "nested too deeply", "flatten the document") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # Scalars the safe constructors cannot build: 2001-13-45, !!int zz, !!timestamp x,
        # an integer of more than 4300 digits.
        raise SpecError(file, "(syntax)", f"not a valid YAML value: {exc}"[:300],
                        "quote the value or fix it") from None
    _check_shape(data, file)
    return data


def _check_shape(data: Any, file: str) -> None:
    budget = MAX_VALUES
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        if depth >= MAX_DEPTH:
            raise SpecError(file, "(document)", f"nested more than {MAX_DEPTH} levels deep",
                            "flatten the document; an alias may not contain itself")
        budget -= len(value) * (2 if isinstance(value, dict) else 1)
        if budget < 0:
            raise SpecError(file, "(document)", f"more than {MAX_VALUES} values (aliases "
                            "expanded)", "write a smaller document; avoid alias bombs")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in children)


class Fields:
    """A mapping being validated: knows its file and field path, rejects unknown keys."""

    def __init__(self, data: Any, file: str, field: str, allowed: Iterable[str]) -> None:
        if not isinstance(data, dict):
            raise SpecError(file, field or "(top level)",
                            f"expected a mapping, got {type(data).__name__}",
                            "write 'key: value' lines")
        self.data = data
        self.file = file
        self.field = field
        allowed = tuple(allowed)
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                raise SpecError(file, self.path(str(key)), "unknown key",
                                f"allowed keys: {', '.join(allowed)}")

    def path(self, key: str) -> str:
        return f"{self.field}.{key}" if self.field else key

    def error(self, key: str, problem: str, fix: str = "") -> SpecError:
        return SpecError(self.file, self.path(key), problem, fix)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def str(self, key: str, default: str | None = None, *, choices: Iterable[str] | None = None,
            pattern: re.Pattern[str] | None = None, max_len: int = 200) -> str:
        if not self.has(key):
            if default is None:
                raise self.error(key, "missing", "this key is required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected text, got {type(value).__name__}")
        if len(value) > max_len:
            raise self.error(key, f"longer than {max_len} characters")
        if choices is not None:
            choices = tuple(choices)
            if value not in choices:
                raise self.error(key, f"'{value}' is not allowed",
                                 f"allowed values: {', '.join(choices)}")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"'{value}' is not a valid name",
                             f"use lower-case letters, digits and '_' (pattern {pattern.pattern})")
        return value

    def opt_str(self, key: str, **kw: Any) -> str | None:
        return self.str(key, **kw) if self.has(key) else None

    def number(self, key: str, default: float | None = None, *, lo: float, hi: float,
               integer: bool = False) -> float:
        if not self.has(key):
            if default is None:
                raise self.error(key, "missing", "this key is required")
            return default
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {type(value).__name__} {value!r}"[:200])
        if integer and not isinstance(value, int):
            raise self.error(key, f"expected a whole number, got {value!r}")
        if value != value or not lo <= value <= hi:  # NaN check first
            raise self.error(key, f"{value!r} is out of range", f"allowed: {lo:g} to {hi:g}")
        return value

    def integer(self, key: str, default: int | None = None, *, lo: int, hi: int) -> int:
        return int(self.number(key, default, lo=lo, hi=hi, integer=True))

    def opt_number(self, key: str, *, lo: float, hi: float) -> float | None:
        return self.number(key, lo=lo, hi=hi) if self.has(key) else None

    def boolean(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}"[:200])
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def sequence(self, key: str, *, max_items: int = 64) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {type(value).__name__}",
                             "write '- item' lines or [a, b]")
        if len(value) > max_items:
            raise self.error(key, f"{len(value)} items, more than the limit of {max_items}")
        return value


def template_context(top: Fields, overrides: dict[str, Any], unknown: str,
                     known: str) -> dict[str, Any]:
    """The jinja2 context of a spec: its ``params`` (names checked) overridden by
    ``overrides``, each of which must be a declared parameter (``unknown``/``known``
    word the error for the kind of file)."""
    defaults = top.mapping("params")
    for key in defaults:
        if not isinstance(key, str) or not NAME_RE.match(key):
            raise top.error(f"params.{key}", "invalid parameter name",
                            "use lower-case letters, digits and '_'")
    for key in overrides:
        if key not in defaults:
            raise SpecError(top.file, f"params.{key}", unknown,
                            f"{known}: {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **overrides}
