"""Sandboxed jinja2 rendering of YAML leaves.

Specs and playbooks are parsed as YAML first; every string leaf that contains ``{{`` or
``{%`` is then rendered with a sandboxed, immutable jinja2 environment whose undefined
variables raise (StrictUndefined). A leaf that is a single expression keeps its native
type, so ``rate_mbit: "{{ rate }}"`` yields an integer. Parsing before rendering means a
template can never inject YAML structure, and a playbook stays data, never code.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, UndefinedError
from jinja2.nativetypes import NativeCodeGenerator, NativeTemplate, native_concat
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from testbed.errors import SpecError

MAX_TEMPLATE_CHARS = 2000


class _NativeSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = NativeCodeGenerator
    concat = staticmethod(native_concat)  # type: ignore[assignment]
    template_class = NativeTemplate  # type: ignore[assignment]


_ENV = _NativeSandbox(undefined=StrictUndefined, autoescape=False)


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
            value = _ENV.from_string(data).render(**context)
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()
            return value
        except UndefinedError as exc:
            known = ", ".join(sorted(context)) or "none"
            raise SpecError(file, field, f"template uses an undefined variable: {exc.message}",
                            f"define it under 'params' or with --set; known: {known}") from None
        except SecurityError as exc:
            raise SpecError(file, field, f"template not allowed: {exc}",
                            "templates may only use parameters, literals and filters") from None
        except TemplateError as exc:
            raise SpecError(file, field, f"template error: {exc}",
                            "check the {{ ... }} expression") from None
        except (ArithmeticError, TypeError, ValueError, OverflowError) as exc:
            raise SpecError(file, field, f"template failed: {exc}",
                            "check the {{ ... }} expression") from None
    return data
