"""Batch mode: several files (or zips of them) -> one row per image, as a table and a CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

import numpy as np

from .decode import UnreadableFile, Upload, decode
from .predict import Classifier

__all__ = ["CHUNK", "columns", "classify_uploads", "to_csv"]

CHUNK = 32  # images per forward pass


def columns(classifiers: Sequence[Classifier]) -> list[str]:
    """Table header: file, then prediction / probability / decision per classifier (prefixed A:, B: when several)."""
    prefixes = [""] if len(classifiers) == 1 else [f"{chr(65 + i)}: " for i in range(len(classifiers))]
    return ["file"] + [f"{p}{c}" for p in prefixes for c in ("prediction", "probability", "decision")]


def classify_uploads(classifiers: Sequence[Classifier], uploads: Iterable[Upload]) -> list[list[str | float]]:
    """One row per upload (see `columns`): the argmax class, its probability, and the class decided at the
    run's operating threshold (validation-chosen; argmax without one). An unreadable file gets its error
    in the prediction column and empty cells."""
    rows: list[list[str | float]] = []
    pending: list[tuple[int, np.ndarray]] = []  # (row index, pixels)

    def flush() -> None:
        for k, clf in enumerate(classifiers):
            for (i, _), probs in zip(pending, clf.probabilities_of([px for _, px in pending]), strict=True):
                top = int(np.argmax(probs))
                rows[i][1 + 3 * k : 4 + 3 * k] = [
                    clf.class_names[top],
                    round(float(probs[top]), 6),
                    clf.class_names[clf.decide(probs)],
                ]
        pending.clear()

    for upload in uploads:
        row: list[str | float] = [upload.name] + [""] * (3 * len(classifiers))
        rows.append(row)
        try:
            if upload.error:
                raise UnreadableFile(upload.error)
            pending.append((len(rows) - 1, decode(upload.data, upload.name)))
        except UnreadableFile as exc:
            row[1] = f"error: {exc}"
        if len(pending) >= CHUNK:
            flush()
    if pending:
        flush()
    return rows


def to_csv(header: Sequence[str], rows: Iterable[Sequence[str | float]]) -> str:
    """The table as CSV text (RFC 4180 quoting)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()
