"""A middlebox that lets the MPTCP handshake through, then strips option 30 mid-connection.

Claim M3: a middlebox that starts removing MPTCP options in the middle of a connection
(a path change to an option-stripping firewall, a state timeout) makes MPTCP fall back to
TCP and the connection survives. An NFQUEUE rule queues the selected direction(s) of the
path's traffic with the server to a worker in the slot node (``_strip_worker``); after
``after_packets`` segments or ``after_bytes`` payload bytes of a direction passed intact, it
strips option 30 from every later segment of that direction (``mode: nop`` overwrites it
with NOPs like TCPOPTSTRIP, ``remove`` takes it out as in ``strip_mp_capable``).

What the kernel does then is measured, not assumed: ``finish`` classifies the outcome from
the evidence (the application outcome, counter deltas, RSTs in the pcaps, bytes per path)
as ``clean_fallback`` (the connection fell back to TCP and completed), ``subflow_reset_
continue`` (the stripped subflow was reset, another subflow finished the transfer),
``stall`` (the transfer stopped until the client's timeout), ``corrupt`` (the byte stream
the application got was wrong: a TLS record failed its MAC, or the SHA-256 differs, e.g.
when one end fell back to TCP and the other kept MPTCP), ``abort`` (the connection was torn
down otherwise), ``unaffected`` (completed with neither fallback nor reset), ``not_triggered``
(option 30 was seen but the threshold never reached) or ``no_mptcp`` (nothing carried
option 30: the TCP control). The report carries the evidence that decided it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from testbed.errors import SpecError
from testbed.middleboxes.base import Middlebox
from testbed.middleboxes.strip_mp_capable import WORKER, read_strip_log
from testbed.model.facts import MIN_PATH_BYTES
from testbed.model.params import ParamSpec

if TYPE_CHECKING:
    from testbed.runtime.network import Network
    from testbed.runtime.node import Node

QUEUE_NUM = 31
DEFAULT_AFTER_BYTES = 100_000
# Counter deltas reported as evidence (summed per node, non-zero only).
FALLBACK = ("MPTcpExtDssFallback", "MPTcpExtInfiniteMapTx", "MPTcpExtInfiniteMapRx",
            "MPTcpExtDSSCorruptionFallback", "MPTcpExtMPCapableDataFallback")
RESET = ("MPTcpExtMPRstTx", "MPTcpExtMPRstRx", "MPTcpExtMPFastcloseTx",
         "MPTcpExtMPFastcloseRx", "MPTcpExtDSSCorruptionReset", "MPTcpExtFallbackFailed")
EVIDENCE_COUNTERS = (*FALLBACK, *RESET, "MPTcpExtMPFailTx", "MPTcpExtMPFailRx",
                     "MPTcpExtMPTCPRetrans", "MPTcpExtDSSNoMatchTCP", "MPTcpExtRmSubflow",
                     "MPTcpExtMPJoinAckRx")
OUTCOMES = ("clean_fallback", "subflow_reset_continue", "stall", "corrupt", "abort",
            "unaffected", "not_triggered", "no_mptcp")
CORRUPT_STATUSES = ("tls_error", "checksum_mismatch")


def rst_segments(pcap: Path) -> int:
    """RST segments in a pcap (0 when there is none)."""
    from testbed.model.wire import RST, read_pcap

    if not pcap.exists():
        return 0
    return sum(1 for seg in read_pcap(pcap) if seg.flags & RST)


def classify(*, stripped: int, with_option: int, ok: bool, status: str | None,
             fell_back: bool, reset: bool, other_path_bytes: int) -> str:
    """The outcome class from the measured evidence (see the module docstring)."""
    if stripped == 0:
        return "no_mptcp" if with_option == 0 else "not_triggered"
    if not ok:
        if status == "timeout":
            return "stall"
        return "corrupt" if status in CORRUPT_STATUSES else "abort"
    if fell_back and not reset:
        return "clean_fallback"
    if reset and other_path_bytes >= MIN_PATH_BYTES:
        return "subflow_reset_continue"
    if fell_back:
        return "clean_fallback"
    return "unaffected"


class StripMptcpAfter(Middlebox):
    kind = "strip_mptcp_after"
    description = ("lets the MPTCP handshake through, then strips TCP option 30 from a "
                   "direction's segments after N packets or bytes (NFQUEUE worker); the "
                   "outcome is classified from the evidence")
    params: ClassVar[dict[str, ParamSpec]] = {
        "direction": ParamSpec("direction", str, "s2c",
                               "whose segments lose option 30: c2s (client to server), s2c "
                               "or both (each direction counts its own segments and bytes)",
                               choices=("c2s", "s2c", "both")),
        "after_packets": ParamSpec("after_packets", int, 0,
                                   "strip after this many segments of the direction passed "
                                   "intact (0: count bytes instead)", lo=0, hi=10**9),
        "after_bytes": ParamSpec("after_bytes", int, DEFAULT_AFTER_BYTES,
                                 "strip after this many payload bytes of the direction "
                                 "passed intact (0: count packets instead; left out when "
                                 "after_packets is given)", lo=0, hi=10**12),
        "mode": ParamSpec("mode", str, "nop",
                          "nop: overwrite the option with NOPs (as TCPOPTSTRIP); remove: "
                          "take it out and shorten the header", choices=("nop", "remove")),
    }
    requires = frozenset({"iptables", "nfqueue"})
    capture_upstream = True
    template = """\
*mangle
{% if direction in ("c2s", "both") -%}
-A FORWARD -p tcp -d {{ server }} -j NFQUEUE --queue-num {{ queue }} --queue-bypass
{% endif -%}
{% if direction in ("s2c", "both") -%}
-A FORWARD -p tcp -s {{ server }} -j NFQUEUE --queue-num {{ queue }} --queue-bypass
{% endif -%}
COMMIT
"""

    @classmethod
    def validate(cls, params: dict[str, Any], file: str, field: str) -> dict[str, Any]:
        """One trigger: after_packets or after_bytes (after_packets alone drops the
        after_bytes default)."""
        out = super().validate(params, file, field)
        if out["after_packets"] > 0 and "after_bytes" not in params:
            out["after_bytes"] = 0
        if out["after_packets"] > 0 and out["after_bytes"] > 0:
            raise SpecError(file, f"{field}.after_packets", "both after_packets and "
                            "after_bytes are given", "give one of them (set the other to 0)")
        if out["after_packets"] == 0 and out["after_bytes"] == 0:
            raise SpecError(file, f"{field}.after_bytes", "neither after_packets nor "
                            "after_bytes is given", "give one of them a value above 0")
        return out

    def variables(self, node: Node, net: Network) -> dict[str, Any]:
        return {"queue": QUEUE_NUM, "server": self.server_address}

    def start_workers(self) -> None:
        self.start_worker(WORKER, {
            "queue": QUEUE_NUM, "mode": self.values["mode"], "server": self.server_address,
            "log": str(self.evidence("strips.jsonl")),
            "after": {"direction": self.values["direction"],
                      "packets": self.values["after_packets"],
                      "bytes": self.values["after_bytes"]}}, "worker")

    def log(self) -> list[dict[str, Any]]:
        return read_strip_log(self.evidence("strips.jsonl")) if self.evidence_dir else []

    def finish(self, facts: dict[str, Any]) -> dict[str, Any]:
        assert self.evidence_dir is not None
        records = self.log()
        summary = next((r for r in reversed(records) if r.get("event") == "summary"), {})
        strips = [r for r in records if r.get("event") == "strip"]
        starts = {r["direction"]: r for r in records if r.get("event") == "start"}
        stripped = {d: sum(r["direction"] == d for r in strips) for d in ("c2s", "s2c")}
        with_option = sum((summary.get(d) or {}).get("with_option", 0) for d in ("c2s", "s2c"))
        counters = {node: {k: v for k, v in values.items() if k in EVIDENCE_COUNTERS and v}
                    for node, values in (facts.get("counters") or {}).items()}
        counters = {node: values for node, values in counters.items() if values}
        total = {name: sum(v.get(name, 0) for v in counters.values())
                 for name in EVIDENCE_COUNTERS}
        rsts = {p.stem: rst_segments(p) for p in sorted(self.evidence_dir.glob("*.pcap"))
                if not p.name.startswith("middlebox-")}
        if self.upstream_pcap is not None:
            rsts["upstream"] = rst_segments(self.upstream_pcap)
        outcome_path = self.evidence_dir / "app-outcome.json"
        app = json.loads(outcome_path.read_text()) if outcome_path.exists() else {}
        mptcp_info = app.get("mptcp") or {}
        fell_back = (any(total[n] for n in FALLBACK) or bool(mptcp_info.get("fallback")))
        reset = (any(total[n] for n in RESET)
                 or rsts.get(self.path, 0) + rsts.get("upstream", 0) > 0)
        other = sum(b for p, b in (facts.get("bytes_per_path") or {}).items() if p != self.path)
        ok = facts.get("status") == "ok" and bool(facts.get("checksum_match"))
        outcome = classify(stripped=sum(stripped.values()), with_option=with_option, ok=ok,
                           status=facts.get("status"), fell_back=fell_back, reset=reset,
                           other_path_bytes=other)
        evidence = [f"status {facts.get('status')}",
                    *([f"error {app['error'][:160]}"] if app.get("error") else []),
                    f"{app.get('bytes_received', 0)} of {app.get('bytes_expected', '?')} "
                    "bytes received",
                    f"{sum(stripped.values())} segments stripped ({stripped['c2s']} c2s, "
                    f"{stripped['s2c']} s2c)"]
        evidence += [f"{n}={total[n]}" for n in EVIDENCE_COUNTERS if total[n]]
        evidence += [f"{n} RST on {p}" for p, n in rsts.items() if n]
        evidence.append(f"{other} bytes on other paths")
        return {
            "outcome": outcome,
            "evidence": "; ".join(evidence),
            "stripped": sum(stripped.values()),
            "stripped_c2s": stripped["c2s"],
            "stripped_s2c": stripped["s2c"],
            "segments_with_option": with_option,
            "started": {d: {k: r[k] for k in ("time", "after_segments", "after_payload_bytes")}
                        for d, r in starts.items() if stripped[d]},
            "fell_back": fell_back,
            "reset": reset,
            "rst_segments": rsts,
            "counters": counters,
            "bytes_received": app.get("bytes_received", 0),
            "bytes_on_other_paths": other,
            "mptcp_info_fallback": mptcp_info.get("fallback"),
        }
