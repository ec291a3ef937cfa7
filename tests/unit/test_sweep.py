"""Parameter sweeps: ``sweep: {param: [v1, v2]}`` expands into one scenario per combination,
each named ``<name>[param=value,...]``; errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import SpecError
from testbed.model.playbook import expand_sweeps, load_playbook

BASE = """\
name: sw
claim: M1
params: {app: python, bytes: 1000, rate: 50}
topology: {name: dual_path, params: {wifi_rate_mbit: "{{ rate }}"}}
app: {kind: "{{ app }}", bytes: "{{ bytes }}"}
expect:
  mptcp: {status: ok}
"""


def write(tmp_path: Path, sweep: str) -> Path:
    path = tmp_path / "sw.yaml"
    path.write_text(BASE + sweep)
    return path


def test_cartesian_product_in_the_order_written(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep: {app: [python, openssl], rate: [10, 50, 100]}\n")
    pbs = expand_sweeps(path)
    assert [p.name for p in pbs] == [
        "sw[app=python,rate=10]", "sw[app=python,rate=50]", "sw[app=python,rate=100]",
        "sw[app=openssl,rate=10]", "sw[app=openssl,rate=50]", "sw[app=openssl,rate=100]"]
    assert [p.app.kind for p in pbs] == ["python"] * 3 + ["openssl"] * 3
    assert pbs[0].params == {"app": "python", "bytes": 1000, "rate": 10}
    link = next(lk for lk in pbs[0].topology.links if lk.path == "wifi" and lk.rate_mbit)
    assert link.rate_mbit == 10
    assert {p.claim for p in pbs} == {"M1"} and len({p.sha256 for p in pbs}) == 1


def test_set_on_the_command_line_fixes_a_swept_parameter(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep: {app: [python, openssl], rate: [10, 50]}\n")
    assert [p.name for p in expand_sweeps(path, {"app": "openssl"})] == [
        "sw[rate=10]", "sw[rate=50]"]
    assert [p.name for p in expand_sweeps(path, {"app": "openssl", "rate": 20})] == ["sw"]


def test_no_sweep_and_load_playbook_unchanged(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(BASE)
    assert [p.name for p in expand_sweeps(plain)] == ["sw"]
    swept = write(tmp_path, "sweep: {rate: [10, 50]}\n")
    pb = load_playbook(swept)  # the defaults, as before sweeps existed
    assert pb.name == "sw" and pb.params["rate"] == 50


@pytest.mark.parametrize(("sweep", "field", "words"), [
    ("sweep: {nope: [1, 2]}", "sweep.nope", "not a declared parameter"),
    ("sweep: {rate: []}", "sweep.rate", "non-empty list"),
    ("sweep: {rate: 10}", "sweep.rate", "non-empty list"),
    ("sweep: [rate]", "sweep", "mapping"),
    ("sweep: {}", "sweep", "mapping"),
    ("sweep: {app: [python, '../x']}", "sweep.app[1]", "not a plain value"),
    ("sweep: {app: [python, {a: 1}]}", "sweep.app[1]", "not a plain value"),
    ("sweep: {rate: [10, 10]}", "sweep.rate", "listed twice"),
    ("sweep: {rate: [" + ", ".join(str(i) for i in range(1, 18)) + "]}", "sweep.rate",
     "more than 16"),
    ("sweep: {rate: [1,2,3,4,5,6,7,8,9], bytes: [1,2,3,4,5,6,7,8]}", "sweep",
     "more than 64 combinations"),
])
def test_errors_name_the_field(tmp_path: Path, sweep: str, field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        expand_sweeps(write(tmp_path, sweep + "\n"))
    assert err.value.field == field
    assert words in str(err.value)
    assert str(tmp_path / "sw.yaml") in str(err.value)


def test_a_combination_that_fails_validation_names_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        expand_sweeps(write(tmp_path, "sweep: {app: [python, curl]}\n"))
    assert err.value.field == "app.kind"
    assert "(with sweep app=curl)" in str(err.value)


def test_sweep_values_are_data_not_templates(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep: {app: [python, '{{ 7 * 7 }}']}\n")
    with pytest.raises(SpecError) as err:
        expand_sweeps(path)
    assert err.value.field == "sweep.app[1]"
