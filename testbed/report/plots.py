"""Plots for the report, drawn with matplotlib (Agg) and returned as inline SVG text.

Each function takes already-loaded evidence and returns ``None`` when the evidence holds
nothing worth drawing, so a report never shows an empty chart.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# Text stays text (small, searchable SVG); ids are stable from one rebuild to the next.
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "svg.hashsalt": "testbed"}
P = ParamSpec("P")
R = TypeVar("R")


def _styled(func: Callable[P, R]) -> Callable[P, R]:
    """Draw with the report's style without touching matplotlib's global settings (and
    with no pyplot: figures are plain objects, nothing to close)."""
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with matplotlib.rc_context(STYLE):
            return func(*args, **kwargs)
    return wrapper


def _subplots(w: float, h: float, **kwargs: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h))
    return fig, fig.subplots(**kwargs)
PATH_COLORS = {"wifi": "#1f77b4", "cell": "#ff7f0e"}
EXTRA_COLORS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")
TRANSPORT_LABEL = {"tcp": "TLS/TCP", "mptcp": "TLS/MPTCP"}
SEEN_COLORS = {"yes": "#d62728", "partial": "#ff9f40", "no": "#dfe6ee", "n/a": "#ffffff"}


def _color(path: str, paths: list[str]) -> str:
    if path in PATH_COLORS:
        return PATH_COLORS[path]
    return EXTRA_COLORS[paths.index(path) % len(EXTRA_COLORS)]


def to_svg(fig: Figure, title: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML
    # Accessible name, and a class the report (and its test) can find.
    return svg.replace("<svg ", f'<svg class="plot" role="img" aria-label="{_attr(title)}" ',
                       1)


def _attr(text: str) -> str:
    return (text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
            .replace(">", "&gt;"))


@_styled
def bytes_per_path(per_transport: dict[str, dict[str, int]], title: str) -> str | None:
    """Grouped bars: payload bytes each path's capture carried, per transport."""
    paths = sorted({p for d in per_transport.values() for p in d},
                   key=lambda p: (p not in PATH_COLORS, list(PATH_COLORS).index(p)
                                  if p in PATH_COLORS else 0, p))
    transports = [t for t in ("tcp", "mptcp") if t in per_transport] + \
        [t for t in per_transport if t not in ("tcp", "mptcp")]
    if not paths or not transports:
        return None
    fig, ax = _subplots(4.6, 2.4)
    width = 0.8 / len(paths)
    for i, path in enumerate(paths):
        xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(transports))]
        ys = [per_transport[t].get(path, 0) / 1e6 for t in transports]
        bars = ax.bar(xs, ys, width * 0.95, label=path, color=_color(path, paths))
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    ax.set_xticks(range(len(transports)), [TRANSPORT_LABEL.get(t, t) for t in transports])
    ax.set_ylabel("payload bytes (MB)")
    ax.set_title(title, fontsize=9)
    ax.legend(title="path", fontsize=7, title_fontsize=7, frameon=False,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.18)
    return to_svg(fig, title)


OBSERVER_COLUMNS = ("SNI", "MPTCP keys", "join tokens", "server address")


@_styled
def observer_grid(grid: dict[str, dict[str, dict[str, str]]], title: str) -> str | None:
    """What each single-path observer saw: rows 'path / transport', columns SNI, keys,
    tokens, server address; each cell yes / partial / no."""
    rows = [(t, p) for t in ("tcp", "mptcp") if t in grid for p in grid[t]]
    if not rows:
        return None
    fig, ax = _subplots(4.6, 0.42 * len(rows) + 0.7)
    for r, (t, p) in enumerate(rows):
        for c, col in enumerate(OBSERVER_COLUMNS):
            value = grid[t][p].get(col, "n/a")
            ax.add_patch(Rectangle(
                (c, r), 0.96, 0.9, color=SEEN_COLORS.get(value, "#dfe6ee")))
            ax.text(c + 0.48, r + 0.45, value, ha="center", va="center", fontsize=8,
                    color="white" if value == "yes" else "#222")
    ax.set_xlim(0, len(OBSERVER_COLUMNS))
    ax.set_ylim(len(rows), 0)
    ax.set_xticks([c + 0.48 for c in range(len(OBSERVER_COLUMNS))], OBSERVER_COLUMNS)
    ax.xaxis.tick_top()
    ax.set_yticks([r + 0.45 for r in range(len(rows))],
                  [f"{p} observer, {TRANSPORT_LABEL.get(t, t)}" for t, p in rows])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=9, pad=18)
    return to_svg(fig, title)


@_styled
def timeline(series: dict[str, dict[str, list[tuple[float, int]]]], title: str,
             events: dict[str, list[tuple[float, str]]] | None = None) -> str | None:
    """Bytes received by the client per path against time (from the ``ss`` samples), one
    panel per transport; vertical lines for timed events (a path blackholed)."""
    transports = [t for t in ("tcp", "mptcp") if series.get(t)]
    longest = max((len(points) for t in transports for points in series[t].values()),
                  default=0)
    if not transports or (longest < 4 and not any((events or {}).values())):
        return None  # a transfer shorter than a few samples draws no useful line
    fig, axes = _subplots(3.3 * len(transports), 2.3, nrows=1, ncols=len(transports),
                          sharey=True, squeeze=False)
    all_paths = sorted({p for t in transports for p in series[t]})
    for ax, t in zip(axes[0], transports, strict=True):
        for path, points in sorted(series[t].items()):
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.step(xs, [y / 1e6 for y in ys], where="post", label=path,
                    color=_color(path, all_paths), marker=".", markersize=3,
                    linestyle="-" if path == all_paths[0] else "--")
        for at, label in (events or {}).get(t, []):
            ax.axvline(at, color="#d62728", linestyle="--", linewidth=1)
            ax.annotate(label, (at, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color="#d62728", xytext=(3, -10), textcoords="offset points")
        ax.set_title(TRANSPORT_LABEL.get(t, t), fontsize=9)
        ax.set_xlabel("seconds since the client started")
        ax.legend(fontsize=7, frameon=False)
    axes[0][0].set_ylabel("bytes received (MB)")
    fig.suptitle(title, fontsize=9, y=1.06)
    return to_svg(fig, title)


@_styled
def fallback_outcomes(rows: list[dict[str, Any]], title: str) -> str | None:
    """Per middlebox scenario: MPTCP subflows, colour by outcome (kept MPTCP, fell back,
    failed)."""
    if not rows:
        return None
    fig, ax = _subplots(5.6, 0.45 * len(rows) + 0.9)
    colors = {"MPTCP kept": "#2ca02c", "fell back to TCP": "#ff7f0e", "failed": "#d62728"}
    for i, r in enumerate(rows):
        ax.barh(i, r["subflows"], color=colors[r["outcome"]], height=0.6)
        ax.text(r["subflows"] + 0.05, i, f"{r['outcome']} ({r['status']})", va="center",
                fontsize=7)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("subflows under TLS/MPTCP")
    ax.set_xlim(0, max(r["subflows"] for r in rows) + 1.6)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title, fontsize=9)
    return to_svg(fig, title)


JOIN_COUNTERS = (("MPTcpExtMPJoinSynRx", "join SYN received"),
                 ("MPTcpExtMPJoinAckRx", "join accepted"),
                 ("MPTcpExtMPJoinNoTokenFound", "unknown token"),
                 ("MPTcpExtMPJoinSynAckHMacFailure", "bad HMAC (SYN/ACK)"),
                 ("MPTcpExtMPJoinAckHMacFailure", "bad HMAC (ACK)"),
                 ("MPTcpExtMPJoinRejected", "rejected by limits"))


@_styled
def join_outcomes(rows: list[tuple[str, dict[str, int]]], title: str) -> str | None:
    """Join attempts and outcomes per scenario (server counter deltas under MPTCP)."""
    rows = [(label, c) for label, c in rows if any(c.get(k) for k, _ in JOIN_COUNTERS)]
    if not rows:
        return None
    fig, ax = _subplots(5.6, 0.5 * len(rows) + 1.1)
    n = len(JOIN_COUNTERS)
    height = 0.8 / n
    palette = ("#7f7f7f", "#2ca02c", "#9467bd", "#d62728", "#e377c2", "#ff7f0e")
    for j, (key, label) in enumerate(JOIN_COUNTERS):
        ys = [i + (j - (n - 1) / 2) * height for i in range(len(rows))]
        ax.barh(ys, [c.get(key, 0) for _, c in rows], height * 0.95, label=label,
                color=palette[j])
        for y, (_, c) in zip(ys, rows, strict=True):
            if c.get(key):
                ax.text(c[key], y, f" {c[key]}", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.invert_yaxis()
    # Symmetric log: one accepted join and 200 guessed tokens on the same axis.
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(max(c.get(k, 0) for k, _ in JOIN_COUNTERS) for _, c in rows) * 2)
    ax.set_xlabel("count (server, counter delta; log scale above 1)")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    return to_svg(fig, title)


_TIMED = re.compile(r"at transfer start \+ ([0-9.]+)\s*s")


def timed_events(middlebox_reports: dict[str, str]) -> list[tuple[float, str]]:
    """Timed middlebox actions (e.g. ``inserted at transfer start + 0.5s``) from the
    middlebox reports: (seconds, label)."""
    out = []
    for label, text in middlebox_reports.items():
        for m in _TIMED.finditer(text):
            out.append((float(m.group(1)), label))
    return out
