"""Playbook fields that become paths cannot leave the run's directory, and huge values are
bounded with a message naming the field.

The evidence directory of a scenario is ``<run dir>/<playbook name>/<transport>``; the name
is the playbook's ``name`` (after template rendering, so ``--set`` reaches it) plus, for a
sweep, ``[param=value,...]``. The topology file is ``topologies/<topology.name>.yaml``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.errors import SpecError
from testbed.model.playbook import expand_sweeps, parse_playbook

REPO = Path(__file__).resolve().parents[2]
BASELINE = yaml.safe_load((REPO / "playbooks" / "baseline.yaml").read_text())
O2 = yaml.safe_load((REPO / "playbooks" / "o2_join_guess.yaml").read_text())
A2 = yaml.safe_load((REPO / "playbooks" / "a2_blackhole.yaml").read_text())
FILE = "x.yaml"
TRAVERSALS = ["..", "../..", "../../etc", "/etc", "a/b", "a/../../b", "./x", "x\x00y",
              "..\\..\\x", "%2e%2e", "\u2024\u2024", "~root"]


def _inside(run_dir: Path, name: str) -> bool:
    evidence = (run_dir / name / "tcp").resolve()
    return evidence.is_relative_to(run_dir.resolve()) and \
        evidence.parent.parent == run_dir.resolve()


@pytest.mark.parametrize("value", TRAVERSALS)
@pytest.mark.parametrize("field", ["name", "topology.name"])
def test_templated_names_cannot_traverse(value: str, field: str) -> None:
    doc = copy.deepcopy(BASELINE)
    doc["params"]["n"] = "x"
    if field == "name":
        doc["name"] = "{{ n }}"
    else:
        doc["topology"]["name"] = "{{ n }}"
    with pytest.raises(SpecError) as info:
        parse_playbook(yaml.safe_dump(doc), FILE, {"n": value})
    assert str(info.value).startswith(f"{FILE}: {field}: "), str(info.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(TRAVERSALS),
                          st.text(alphabet="./\\ab_-+\x00", min_size=1, max_size=8)),
                min_size=1, max_size=3, unique=True))
def test_sweep_names_stay_in_the_run_directory(values: list[str]) -> None:
    doc = copy.deepcopy(BASELINE)
    doc["params"]["tag"] = "a"
    doc["description"] = "{{ tag }}"
    doc["sweep"] = {"tag": values}
    run_dir = Path("/nonexistent/results/run")
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"tb-paths-{os.getpid()}"
    d.mkdir(exist_ok=True)
    path = d / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        books = expand_sweeps(path)
    except SpecError as exc:
        assert str(exc).startswith(f"{path}: sweep"), str(exc)
        return
    finally:
        path.unlink()
        d.rmdir()
    for book in books:
        assert "/" not in book.name and "\x00" not in book.name, book.name
        assert _inside(run_dir, book.name), book.name


HUGE: list[tuple[dict[str, Any], str, Any]] = [
    (BASELINE, "app.bytes", 10**13),
    (BASELINE, "repeat", 10**6),
    (BASELINE, "app.timeout_s", 10**9),
    (BASELINE, "app.port", 10**6),
    (BASELINE, "app.sni", "a" * 100_000),
    (BASELINE, "description", "x" * 100_000),
    (BASELINE, "topology.params.wifi_rate_mbit", 10**9),
    (O2, "attacks.0.attempts", 10**12),
    (A2, "middleboxes.0.after_s", 10.0**12),
]


@pytest.mark.parametrize(("doc", "field", "value"), HUGE,
                         ids=[f for _d, f, _v in HUGE])
def test_huge_values_are_bounded(doc: dict[str, Any], field: str, value: Any) -> None:
    doc = copy.deepcopy(doc)
    *parents, last = field.split(".")
    node: Any = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[last] = value
    with pytest.raises(SpecError) as info:
        parse_playbook(yaml.safe_dump(doc), FILE, {})
    shown = field.replace(".0.", "[0].").replace("topology.params.wifi_rate_mbit",
                                                 "topology.params")
    msg = str(info.value)
    assert msg.startswith(f"{FILE}: {shown}"), msg
    assert len(msg) < 2000
