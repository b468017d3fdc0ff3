"""Describing a partition: per-client label counts as rows, a text table and a bar plot
(matplotlib, imported only when used)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def label_count_table(
    labels: np.ndarray, partitions: Sequence[np.ndarray], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-client label counts.

    Returns one row per client: ``{"client": i, "n": size, <class name>: count, ...}`` with the
    class columns in ``class_names`` order.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    names = [str(c) for c in class_names]
    clash = {"client", "n"} & set(names)
    if clash or len(set(names)) != len(names):
        raise ValueError(f"class names must be unique and not 'client'/'n', got {names}")
    rows: list[dict[str, Any]] = []
    for i, idx in enumerate(partitions):
        counts = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=len(names))
        if len(counts) > len(names):
            raise ValueError(f"labels go up to {len(counts) - 1} but there are {len(names)} names")
        row: dict[str, Any] = {"client": i, "n": len(idx)}
        row.update({name: int(c) for name, c in zip(names, counts, strict=True)})
        rows.append(row)
    return rows


def format_label_table(rows: Sequence[dict[str, Any]]) -> str:
    """An aligned plain-text table of :func:`label_count_table` rows, with a total line."""
    if not rows:
        return "(no clients)"
    cols = list(rows[0].keys())
    total: dict[str, Any] = {c: sum(int(r[c]) for r in rows) for c in cols}
    total["client"] = "total"
    body = [[str(r[c]) for c in cols] for r in [*rows, total]]
    widths = [max(len(c), *(len(b[j]) for b in body)) for j, c in enumerate(cols)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))

    lines = [fmt(cols), "  ".join("-" * w for w in widths)]
    lines += [fmt(b) for b in body[:-1]]
    lines += ["  ".join("-" * w for w in widths), fmt(body[-1])]
    return "\n".join(lines)


def plot_label_counts(rows: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path) -> Path:
    """Save a stacked bar chart (one bar per client, one colour per class) as PNG at ``path``.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in class_names]
    clients = [str(r["client"]) for r in rows]
    fig = Figure(figsize=(max(4.0, 0.45 * len(rows) + 2.0), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bottom = np.zeros(len(rows))
    for name in names:
        vals = np.array([float(r.get(name, 0)) for r in rows])
        ax.bar(clients, vals, bottom=bottom, label=name)
        bottom += vals
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.set_title("label counts per client")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
