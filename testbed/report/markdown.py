"""The claims matrix as Markdown (``report.md``), for pasting into an issue or a paper."""

from __future__ import annotations

from testbed.model.matrix import FLAKY, TRANSPORT_LABEL, Cell, Matrix


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "—"
    if cell.verdict == FLAKY:
        return "FLAKY (" + ", ".join(f"{n}× {v}" for v, n in sorted(
            cell.distribution.items())) + ")"
    text = cell.verdict
    if cell.measured_verdict:
        text += f" (measured {cell.measured_verdict})"
    elif len(cell.attempts) > 1:
        text += f" ({len(cell.attempts)}/{len(cell.attempts)})"
    return text


def render_markdown(matrix: Matrix) -> str:
    env = matrix.environment
    lines = [f"# Claims matrix — run {matrix.run_id}", "",
             f"Kernel {env.get('kernel', '?')} ({env.get('machine', '?')}), commit "
             f"{str(env.get('git_commit') or '?')[:12]}, started {matrix.started}"
             + ("" if matrix.complete else " — INCOMPLETE: the run was interrupted") + ".",
             "",
             f"| claim | setting | {TRANSPORT_LABEL['tcp']} | {TRANSPORT_LABEL['mptcp']} "
             "| verdict | reason |",
             "|---|---|---|---|---|---|"]
    for row in matrix.rows:
        name = row.claim if row.key == row.claim.lower() or row.key == row.claim else \
            f"{row.claim} `{row.key}`"
        verdict = row.verdict + (" (flaky)" if row.flaky and row.verdict != FLAKY else "")
        lines.append(f"| {_esc(name)} | {_esc(row.setting)} | "
                     f"{cell_text(row.cells.get('tcp'))} | {cell_text(row.cells.get('mptcp'))}"
                     f" | **{verdict}** | {_esc(row.reason)} |")
    if matrix.uncovered:
        lines += ["", "Claims of the catalogue with no playbook in this run: "
                  + ", ".join(matrix.uncovered) + "."]
    counts = matrix.counts()
    if counts:
        lines += ["", "Totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                  + "."]
    return "\n".join(lines) + "\n"
