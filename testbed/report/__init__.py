"""Reports of a run, rebuilt from its stored evidence alone (``testbed report RUN_DIR``):
``matrix.json``, ``report.html`` (one self-contained file), ``report.md`` and
``junit.xml``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.model.matrix import Matrix, build_matrix

REQUEST_FILE = "matrix-request.json"  # what `testbed matrix` was asked (only/skip/repeat)
OUTPUTS = ("matrix.json", "report.html", "report.md", "junit.xml")


class NotARunDir(TestbedError):
    """The directory holds no readable result.json."""


def read_result(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "result.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotARunDir(f"{run_dir}: no result.json here (give a directory that "
                         "'testbed run' or 'testbed matrix' wrote, e.g. results/<run-id>)"
                         ) from None
    except (OSError, ValueError) as exc:
        raise NotARunDir(f"{path}: cannot read it: {exc}") from None
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith(
            "testbed.result/"):
        raise NotARunDir(f"{path}: not a testbed result (schema {data.get('schema')!r})"
                         if isinstance(data, dict) else f"{path}: not a testbed result")
    return data


def load_matrix(run_dir: Path) -> Matrix:
    """The matrix of a stored run, recomputed from result.json."""
    selection: dict[str, Any] = {}
    request = run_dir / REQUEST_FILE
    if request.exists():
        try:
            selection = json.loads(request.read_text())
        except (OSError, ValueError):
            selection = {}
    return build_matrix(read_result(run_dir), selection=selection)


def write_reports(run_dir: Path) -> dict[str, Path]:
    """(Re)write every report of ``run_dir`` from its stored evidence; returns them by name."""
    from testbed.report.html import render_html
    from testbed.report.junit import render_junit
    from testbed.report.markdown import render_markdown

    matrix = load_matrix(run_dir)
    out = {name: run_dir / name for name in OUTPUTS}
    renderers = {  # report.html last: it links the others only if they exist
        "matrix.json": lambda: json.dumps(matrix.to_json(), indent=1, default=str) + "\n",
        "report.md": lambda: render_markdown(matrix),
        "junit.xml": lambda: render_junit(matrix),
        "report.html": lambda: render_html(matrix, run_dir),
    }
    for name, render in renderers.items():
        tmp = out[name].with_name(out[name].name + ".tmp")
        tmp.write_text(render(), encoding="utf-8")
        tmp.replace(out[name])
    return out
