"""Kernel MIB counters: parse ``/proc/net/netstat`` and ``/proc/net/snmp`` text and diff
snapshots. Pure functions; the runtime reads the text from a node's namespace.

Both files hold groups of two lines: a header ``Prefix: Name1 Name2 ...`` and a value line
``Prefix: v1 v2 ...``. Keys are the prefix (without the colon) joined to the field name, as
``nstat`` names them: ``TcpExtBeyondWindow``, ``MPTcpExtMPJoinAckRx``, ``TcpActiveOpens``,
``IpForwDatagrams``. Values are integers, some of them negative (``TcpMaxConn`` is -1);
a field whose value is not an integer is skipped.
"""

from __future__ import annotations

from collections.abc import Mapping

MPTCP_PREFIX = "MPTcpExt"


def _int_or_none(token: str) -> int | None:
    try:
        return int(token, 10)
    except ValueError:
        return None


def parse_proc_net(text: str) -> dict[str, int]:
    """Parse the two-line-per-group format of /proc/net/netstat and /proc/net/snmp.

    A line opens a group (its fields are names) unless it follows a header with the same
    prefix, in which case it holds that header's values. Groups whose lines do not pair up
    or whose lengths differ are ignored, so a truncated read yields the complete groups.
    """
    counters: dict[str, int] = {}
    header: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        prefix, sep, rest = line.partition(":")
        if not sep or not prefix or " " in prefix:
            header = None
            continue
        fields = rest.split()
        if header is not None and header[0] == prefix:
            names = header[1]
            header = None
            if len(fields) != len(names):
                continue  # malformed or truncated group: skip rather than misalign
            for name, token in zip(names, fields, strict=True):
                value = _int_or_none(token)
                if value is not None:
                    counters[prefix + name] = value
        else:
            header = (prefix, fields)
    return counters


def diff(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Non-zero deltas ``after - before``. A counter that appears only in ``after`` counts
    from 0; one that disappeared is ignored. Keys come out sorted."""
    out: dict[str, int] = {}
    for key in sorted(after):
        delta = after[key] - before.get(key, 0)
        if delta:
            out[key] = delta
    return out


def mptcp(delta: Mapping[str, int]) -> dict[str, int]:
    """Only the ``MPTcpExt*`` entries of a snapshot or a delta."""
    return {k: v for k, v in delta.items() if k.startswith(MPTCP_PREFIX)}
