"""Rendered leaves keep YAML's kinds of values: text that reads as a Python-only literal
("...", "1j") stays text, numbers and lists come out native, concatenations are text."""

from __future__ import annotations

from testbed.model.template import render_leaves


def test_values_keep_yaml_kinds() -> None:
    out = render_leaves({"a": "{{ x }}", "b": "{{ y }}", "c": "{{ z }}", "d": "{{ n }}",
                         "e": "{{ n * 2 }}", "f": "a{{ n }}"},
                        {"x": "...", "y": "1j", "z": "[1, 2]", "n": 5}, "f.yaml")
    assert out == {"a": "...", "b": "1j", "c": [1, 2], "d": 5, "e": 10, "f": "a5"}
