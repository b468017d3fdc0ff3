"""MkDocs hook: the campaigns' own reports (`bench/results/<grid>/RESULTS.md`, `SWEEP.md` and the plot) become
pages `results/<grid>/...` of the site, read from the repository at build time, so the site shows exactly what
the campaign wrote and nothing is copied by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

SUFFIXES = {".md", ".png"}


def result_files(root: Path) -> list[Path]:
    """The report files of every campaign folder under `root/bench/results` (not its raw `results.jsonl`)."""
    return sorted(p for p in (root / "bench" / "results").glob("*/*") if p.is_file() and p.suffix in SUFFIXES)


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).resolve().parent
    for path in result_files(root):
        uri = f"results/{path.parent.name}/{path.name}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
