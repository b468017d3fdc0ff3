"""Batch mode: several files (or zips of them) -> one row per image, as a table and a CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

import numpy as np

from .decode import UnreadableFile, Upload, decode
from .predict import Classifier

__all__ = ["CHUNK", "columns", "classify_uploads", "csv_cell", "to_csv"]

CHUNK = 32  # images per forward pass
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
UNLIKE = "unlike the training images"


def columns(classifiers: Sequence[Classifier]) -> list[str]:
    """Table header: file, then prediction / probability / decision per classifier (prefixed A:, B: when several)."""
    prefixes = [""] if len(classifiers) == 1 else [f"{chr(65 + i)}: " for i in range(len(classifiers))]
    return ["file"] + [f"{p}{c}" for p in prefixes for c in ("prediction", "probability", "decision")]


def classify_uploads(classifiers: Sequence[Classifier], uploads: Iterable[Upload]) -> list[list[str | float]]:
    """One row per upload (see `columns`): the argmax class, its probability (3 decimals), and the class decided
    by the page's rule (`Classifier.decide`; "unlike the training images" when the OOD guard refuses it). An
    unreadable file, whatever went wrong with it, gets its one-line error in the prediction column and empty
    cells; the other rows are kept."""
    rows: list[list[str | float]] = []
    pending: list[tuple[int, np.ndarray]] = []  # (row index, pixels)

    def flush() -> None:
        for k, clf in enumerate(classifiers):
            images = [px for _, px in pending]
            probs_all, unusual = clf.assess(images)
            for (i, _), probs, why in zip(pending, probs_all, unusual, strict=True):
                top = int(np.argmax(probs))
                decided = f"{UNLIKE}: {why}" if why else clf.class_names[clf.decide(probs)]
                rows[i][1 + 3 * k : 4 + 3 * k] = [clf.class_names[top], round(float(probs[top]), 3), decided]
        pending.clear()

    for upload in uploads:
        row: list[str | float] = [upload.name] + [""] * (3 * len(classifiers))
        rows.append(row)
        try:
            if upload.error:
                raise UnreadableFile(upload.error)
            pending.append((len(rows) - 1, decode(upload.data, upload.name)))
        except Exception as exc:  # noqa: BLE001 - one bad file is one row, never the whole batch
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            row[1] = f"error: {message if isinstance(exc, UnreadableFile) else 'cannot read the file: ' + message}"
        if len(pending) >= CHUNK:
            flush()
    if pending:
        flush()
    return rows


def csv_cell(value: str | float) -> str | float:
    """A cell a spreadsheet shows as text: strings starting with = + - @ TAB or CR get a leading single quote
    (a file named ``=HYPERLINK(...)`` stays a name, not a formula); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def to_csv(header: Sequence[str], rows: Iterable[Sequence[str | float]]) -> str:
    """The table as CSV text (RFC 4180 quoting), formula-like text cells neutralised (`csv_cell`)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # CRLF: a CR or LF inside a cell gets it quoted
    writer.writerow([csv_cell(c) for c in header])
    writer.writerows([csv_cell(c) for c in row] for row in rows)
    return out.getvalue()
