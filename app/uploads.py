"""Nothing of a patient's image stays on disk: the demo's private Gradio cache.

Gradio writes every upload (and every image or file it returns) into ``GRADIO_TEMP_DIR``. The demo
points that at a fresh directory of its own (mode 0700, ``deer-app-*`` inside ``GRADIO_TEMP_DIR``
or the system temp dir), deletes a request's uploads as soon as the request is done (`forget`),
lets Gradio sweep returned files after a short time, and removes the whole directory when the
server closes or the process exits (`remove`).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable
from pathlib import Path

__all__ = ["STALE_S", "cache_dir", "digest", "forget", "remove"]

STALE_S = 10.0
_DIR: Path | None = None


def cache_dir() -> Path:
    """This process's private Gradio cache; created (and ``GRADIO_TEMP_DIR`` set) on first use."""
    global _DIR
    if _DIR is None or not _DIR.is_dir():
        parent = os.environ.get("GRADIO_TEMP_DIR") if _DIR is None else str(_DIR.parent)
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        _DIR = Path(tempfile.mkdtemp(prefix="deer-app-", dir=parent or None)).resolve()
        os.environ["GRADIO_TEMP_DIR"] = str(_DIR)
        atexit.register(remove)
    return _DIR


def digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def forget(paths: Iterable[str | Path | None], public: Collection[str] = ()) -> None:
    """Delete these files inside the private cache (a finished request's uploads) and their emptied folders.

    Files whose SHA-256 is in `public` (the run's example images, which Gradio caches once and reuses
    for every click) stay, as do files outside the cache. Top-level files untouched for `STALE_S`
    seconds (uploads aborted before Gradio moved them into place) go too.
    """
    if _DIR is None:
        return
    for p in paths:
        if not p:
            continue
        path = Path(p).resolve()
        if not path.is_relative_to(_DIR) or path == _DIR or not path.is_file():
            continue
        if public and digest(path) in public:
            continue
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != _DIR and folder.is_relative_to(_DIR):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
            folder = folder.parent
    now = time.time()
    for entry in _DIR.iterdir():
        try:
            if entry.is_file() and now - entry.stat().st_mtime > STALE_S:
                entry.unlink()
        except OSError:
            continue


def remove() -> None:
    """Delete the private cache with everything in it (server closed, process exiting)."""
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)
