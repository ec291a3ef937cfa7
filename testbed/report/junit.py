"""The matrix as JUnit XML (``junit.xml``): one test case per scenario × transport.

CONFIRMED and QUALIFIED pass (QUALIFIED with its condition in system-out), REFUTED and
FLAKY are failures, ERROR is an error, INCONCLUSIVE, n/a and NOT RUN are skipped with the
reason.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from testbed.model.matrix import FLAKY, NOT_APPLICABLE, NOT_RUN, TRANSPORT_LABEL, Matrix


def render_junit(matrix: Matrix) -> str:
    suite = ET.Element("testsuite", name="mptcp-security-claims",
                       timestamp=str(matrix.started or ""))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for row in matrix.rows:
        for transport, cell in row.cells.items():
            counts["tests"] += 1
            seconds = sum(a.seconds for a in cell.attempts)
            case = ET.SubElement(suite, "testcase", classname=f"claims.{row.claim}",
                                 name=f"{row.key} [{TRANSPORT_LABEL.get(transport, transport)}]",
                                 time=f"{seconds:.3f}")
            total_time += seconds
            message = f"{cell.verdict}: {cell.reason}"
            if cell.verdict in ("CONFIRMED", "QUALIFIED"):
                ET.SubElement(case, "system-out").text = message
            elif cell.verdict in ("REFUTED", FLAKY):
                counts["failures"] += 1
                el = ET.SubElement(case, "failure", message=message[:1000], type=cell.verdict)
                el.text = message
            elif cell.verdict == "ERROR":
                counts["errors"] += 1
                el = ET.SubElement(case, "error", message=message[:1000], type="ERROR")
                el.text = message
            else:  # INCONCLUSIVE, n/a, NOT RUN
                counts["skipped"] += 1
                kind = {NOT_APPLICABLE: "not applicable", NOT_RUN: "not run"}.get(
                    cell.verdict, cell.verdict)
                ET.SubElement(case, "skipped", message=f"{kind}: {cell.reason}"[:1000])
            props = ET.SubElement(case, "properties")
            for name, value in (("verdict", cell.verdict), ("claim", row.claim),
                                ("transport", transport),
                                *(("evidence." + k, v) for k, v in cell.evidence.items())):
                ET.SubElement(props, "property", name=name, value=str(value))
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", f"{total_time:.3f}")
    root = ET.Element("testsuites", name=f"testbed matrix {matrix.run_id}")
    root.append(suite)
    for key, value in counts.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") \
        + "\n"
