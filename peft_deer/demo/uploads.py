"""Nothing of a patient's image stays on disk: the demo's private Gradio cache.

Gradio writes every upload (and every image or file it returns) into ``GRADIO_TEMP_DIR``. The demo
points that at a fresh directory of its own (mode 0700, ``deer-app-*`` inside ``GRADIO_TEMP_DIR``
or the system temp dir), deletes a request's uploads as soon as the request is done (`forget`),
writes what it returns (images, CSVs) there itself and deletes each after a short time (`new_output`,
swept by a background thread), and removes the whole directory when the server closes or the
process exits (`remove`). Gradio's own cache sweep (``delete_cache``) is not used: it tracks files by
path, and an upload with the bytes of a cached example lands on the example's path, so the sweep
would delete the example for everyone.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Iterable
from pathlib import Path

__all__ = ["STALE_S", "cache_dir", "digest", "forget", "new_output", "remove", "sweep"]

STALE_S = 10.0
_DIR: Path | None = None
_OUTPUTS: list[tuple[float, Path]] = []  # (deadline, path) of files the demo returned
_LOCK = threading.Lock()
_SWEEPER: threading.Thread | None = None


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
    for every click) stay, as do files outside the cache.
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
        _delete(path)


def _delete(path: Path) -> None:
    """Delete a file and its folders up to the cache root, as far as they are empty."""
    path.unlink(missing_ok=True)
    folder = path.parent
    while _DIR is not None and folder != _DIR and folder.is_relative_to(_DIR):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            break
        folder = folder.parent


def new_output(name: str, ttl_s: float) -> Path:
    """A fresh path in the private cache for a file the demo returns; deleted `ttl_s` seconds from now."""
    global _SWEEPER
    folder = cache_dir() / secrets.token_hex(8)
    folder.mkdir()
    path = folder / name
    with _LOCK:
        _OUTPUTS.append((time.time() + ttl_s, path))
        if _SWEEPER is None or not _SWEEPER.is_alive():
            _SWEEPER = threading.Thread(target=_sweep_forever, name="deer-app-sweeper", daemon=True)
            _SWEEPER.start()
    return path


def sweep(now: float | None = None) -> None:
    """Delete returned files past their deadline, and top-level files untouched for `STALE_S` seconds
    (uploads aborted before Gradio moved them into place)."""
    now = time.time() if now is None else now
    with _LOCK:
        due = [p for deadline, p in _OUTPUTS if deadline <= now]
        _OUTPUTS[:] = [(d, p) for d, p in _OUTPUTS if d > now]
    for path in due:
        _delete(path)
    if _DIR is None or not _DIR.is_dir():
        return
    for entry in _DIR.iterdir():
        try:
            if entry.is_file() and now - entry.stat().st_mtime > STALE_S:
                entry.unlink()
        except OSError:
            continue


def _sweep_forever() -> None:
    while True:
        time.sleep(1.0)
        sweep()


def remove() -> None:
    """Delete the private cache with everything in it (server closed, process exiting)."""
    with _LOCK:
        _OUTPUTS.clear()
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)
