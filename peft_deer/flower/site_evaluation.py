"""Per-site evaluation: each site scores the final adapter on its own held-out images and returns counts.

The server turns each site's counts (`protocol.SiteCounts`) into accuracy, balanced accuracy, AUC
(binary: from the P(class 1) histograms, ties within a bin counted half, so it is within one bin's
share of pairs of the exact AUC), sensitivity and specificity at the run's decision threshold, plus
a pooled row. These figures come from each site's data without noise: they are NOT covered by the
DP guarantee, so they go to `server-private/` only, and the model card says so without quoting them.
Under DP a site sends no counts at all: it keeps them in its own state directory (`protocol.SiteEvaluated`),
and the server's table only lists which sites evaluated.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..run.io import write_json_atomic
from .protocol import SCORE_BINS, SiteCounts, SiteEvaluated

MODEL_CARD_NOTE = """
## Per-site evaluation (not published)

The sites counted below evaluated this adapter on their own held-out images and returned counts only. Their
figures (accuracy, AUC, sensitivity, specificity per hospital) are computed from each site's data
without noise: they are **not covered by the differential-privacy guarantee** above, so they stay in the
run's `server-private/site_evaluation.*` and are not part of this card.
"""


MODEL_CARD_NOTE_KEPT = """
## Per-site evaluation (kept at the sites)

Each site evaluated this adapter on its own held-out images and kept the figures in its own state
directory (`site-evaluation-client<k>-*.json`): under differential privacy nothing un-noised about a
site's images leaves it, so the server holds no per-site figures and this card quotes none.
"""


def split_reports(reports: list[SiteCounts | SiteEvaluated]) -> tuple[list[SiteCounts], list[int]]:
    """(the sites' counts, the client ids of sites that evaluated and kept their counts)."""
    counts = [r for r in reports if isinstance(r, SiteCounts)]
    return counts, sorted(r.client_id for r in reports if isinstance(r, SiteEvaluated))


def histogram_auc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """AUC = P(score of a positive > score of a negative) from score histograms on the same bins (ties: 1/2)."""
    n0, n1 = int(negatives.sum()), int(positives.sum())
    if n0 == 0 or n1 == 0:
        return None
    below = np.concatenate([[0], np.cumsum(negatives)[:-1]])  # negatives in lower bins
    return float((positives * (below + 0.5 * negatives)).sum() / (n0 * n1))


def site_metrics(confusion: np.ndarray, histograms: np.ndarray | None) -> dict[str, float | int | None]:
    """Metrics of one (K, K) confusion matrix (rows true, columns decided) and optional (2, bins) histograms."""
    confusion = np.asarray(confusion, dtype=np.int64)
    n = int(confusion.sum())
    per_class = confusion.sum(1)
    recalls = [confusion[c, c] / per_class[c] for c in range(len(confusion)) if per_class[c] > 0]
    binary = len(confusion) == 2
    return {
        "images": n,
        "accuracy": float(np.trace(confusion) / n) if n else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "auc": histogram_auc(*np.asarray(histograms)) if binary and histograms is not None else None,
        "sensitivity": float(confusion[1, 1] / per_class[1]) if binary and per_class[1] else None,
        "specificity": float(confusion[0, 0] / per_class[0]) if binary and per_class[0] else None,
    }


def site_table(counts: list[SiteCounts]) -> list[dict]:
    """One row per site (sorted by client id) and a pooled row (client None) over all of them."""
    rows = []
    for c in sorted(counts, key=lambda c: c.client_id):
        rows.append({"client": c.client_id, **site_metrics(np.array(c.confusion), c.score_histograms)})
    if counts:
        confusion = sum(np.array(c.confusion) for c in counts)
        hists = None
        if all(c.score_histograms is not None for c in counts):
            hists = sum(np.array(c.score_histograms) for c in counts)
        rows.append({"client": None, **site_metrics(confusion, hists)})
    return rows


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_site_table(rows: list[dict], threshold: float | None, temperature: float = 1.0) -> str:
    """The table as Markdown, with what it is and is not."""
    rule = "argmax" if threshold is None else f"class 1 iff P(class 1) >= {threshold:.4f} (chosen on validation)"
    rule += f"; P = softmax(logits / {temperature:.4g}) (the temperature fitted on validation)"
    cols = ["images", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity"]
    lines = [
        "# Per-site evaluation of the final adapter (server-private: NOT covered by DP)",
        "",
        f"Each site's own held-out images; decision rule: {rule}.",
        "",
        "| site | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for r in rows:
        name = "all sites" if r["client"] is None else f"client {r['client']}"
        lines.append(f"| {name} | " + " | ".join(_cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_site_evaluation(
    private_dir: Path,
    rows: list[dict],
    threshold: float | None,
    failed: list[str],
    temperature: float = 1.0,
    kept_at_site: list[int] | None = None,
) -> None:
    """`site_evaluation.json` and `.md` in the run's server-private directory (probabilities: softmax(logits /
    temperature), the final adapter's calibration); `kept_at_site`: sites that evaluated and kept their counts."""
    write_json_atomic(
        private_dir / "site_evaluation.json",
        {
            "covered_by_dp": False,
            "decision_threshold": threshold,
            "temperature": temperature,
            "auc_from": f"per-class histograms of P(class 1), {SCORE_BINS} equal bins, ties within a bin counted half",
            "rows": rows,
            "sites_kept_counts": list(kept_at_site or []),
            "sites_failed": failed,
        },
    )
    text = format_site_table(rows, threshold, temperature)
    if kept_at_site:
        text += "\nSites that evaluated and kept their figures (DP): " + ", ".join(map(str, kept_at_site)) + "\n"
    if failed:
        text += "\nSites that could not evaluate: " + "; ".join(failed) + "\n"
    (private_dir / "site_evaluation.md").write_text(text)


def add_model_card_note(out: Path, sites: str = "", kept_at_site: bool = False) -> None:
    """Say in each adapter's model card that per-site figures exist and are server-private and not DP-covered,
    or (`kept_at_site`, under DP) that they stayed at the sites; `sites` says which sites evaluated (e.g.
    "Sites that evaluated: 2 of 3 (not: clients [1]).")."""
    note = MODEL_CARD_NOTE_KEPT if kept_at_site else MODEL_CARD_NOTE
    for name in ("adapter", "adapter-best", "adapter-lora"):
        card = out / name / "README.md"
        if card.is_file() and note not in card.read_text():
            card.write_text(card.read_text().rstrip("\n") + "\n" + note + (f"\n{sites}\n" if sites else ""))


__all__ = [
    "MODEL_CARD_NOTE",
    "MODEL_CARD_NOTE_KEPT",
    "add_model_card_note",
    "format_site_table",
    "histogram_auc",
    "site_metrics",
    "site_table",
    "split_reports",
    "write_site_evaluation",
]
