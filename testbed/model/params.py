"""Parameters of plugin kinds (middleboxes, attacks): declared once, checked with errors
that name the file, the field and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbed.errors import SpecError


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a middlebox or attack kind: its type, default, allowed values, and
    the check that turns a bad value into an error naming the file and field."""

    name: str
    type: type  # int, float, str or bool
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    # Values that are recognised but refused, with the reason (e.g. not implemented yet).
    refused: tuple[tuple[Any, str], ...] = ()

    def describe(self) -> str:
        allowed = ""
        if self.choices is not None:
            allowed = f" one of {', '.join(map(str, self.choices))};"
        elif self.lo is not None or self.hi is not None:
            lo = "" if self.lo is None else self.lo
            hi = "" if self.hi is None else self.hi
            allowed = f" {lo}..{hi};"
        default = "''" if self.default == "" else self.default
        return f"{self.type.__name__},{allowed} default {default}: {self.help}"

    def check(self, value: Any, file: str, field: str) -> Any:
        for bad, why in self.refused:
            if value == bad:
                raise SpecError(file, field, f"{value!r} {why}",
                                f"allowed values: {', '.join(map(str, self.choices or ()))}")
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, self.type)
        if not ok:
            allowed = (f"allowed values: {', '.join(map(str, self.choices))}"
                       if self.choices is not None else f"give a {self.type.__name__}")
            raise SpecError(file, field, f"expected a {self.type.__name__}, got "
                            f"{value!r}"[:200], allowed)
        if self.choices is not None and value not in self.choices:
            raise SpecError(file, field, f"{value!r} is not allowed"[:200],
                            f"allowed values: {', '.join(map(str, self.choices))}")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise SpecError(file, field, f"{value!r} is out of range",
                            f"allowed range: {self.lo}..{self.hi}")
        return value
