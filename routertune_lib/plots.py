"""Figure helpers the study notebooks share: CI error bars, dense-baseline lines, "ours beside the paper" difference
bars, per-layer skip-ratio bars (Figure 4), and saving a figure atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .reporting import write_atomic

PAPER_COLORS = ("lightgray", "darkgray", "silver")


def ci_yerr(rows, center: str = "diff") -> list:
    """``[below, above]`` error-bar lengths of ``rows[center]`` from the ``ci_low`` / ``ci_high`` columns of ``rows``
    (a DataFrame or one row); the interval is the paired 95% CI of the difference, drawn around ``center``."""
    return [rows[center] - rows["ci_low"], rows["ci_high"] - rows[center]]


def baseline(ax, y: float = 0.0, label: str = "dense baseline", **kwargs) -> None:
    """A dashed black horizontal line at ``y`` (the dense model's level)."""
    ax.axhline(y, **{"color": "black", "lw": 1, "ls": "--", "label": label, **kwargs})


def diff_bars(ax, labels, ours, ours_label: str, paper: dict | None = None,
              ylabel: str = "avg accuracy − dense (points)"):
    """Grouped bars per setting: ``ours`` (``diff`` with its ``ci_low``/``ci_high`` CI; one row per label) first, then
    one gray bar series per ``paper`` entry (``{legend label: values per label}``), and the dense baseline at 0."""
    paper = paper or {}
    x = np.arange(len(labels))
    width = 0.8 / (1 + len(paper))
    offset = lambda i: (i - len(paper) / 2) * width
    ax.bar(x + offset(0), ours["diff"], width, yerr=ci_yerr(ours), capsize=4, label=ours_label)
    for i, ((name, values), color) in enumerate(zip(paper.items(), PAPER_COLORS), start=1):
        ax.bar(x + offset(i), list(values), width, color=color, edgecolor="gray", label=name)
    baseline(ax)
    ax.set_xticks(x, labels)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return ax


def skip_ratio_bars(ax, table, title: str) -> None:
    """Figure 4's grouped bars: per routed layer (``table.layer``), one bar series per other column of ``table``
    (skip ratios in [0, 1]), with the 50% line."""
    x = np.arange(len(table))
    cols = [c for c in table.columns if c != "layer"]
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        ax.bar(x + (i - (len(cols) - 1) / 2) * width, table[col], width, label=col)
    baseline(ax, 0.5, "50% skip", color="gray")
    ax.set_xticks(x, table.layer)
    ax.set_xlabel("routed layer (0-based)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)


def save_figure(fig, out_dir: str | Path, name: str) -> Path:
    """``fig`` as ``<out_dir>/<name>.png`` (120 dpi, tight), written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return write_atomic(Path(out_dir) / f"{name}.png", buf.getvalue())
