"""Nothing of a patient's image stays on disk for long: the demo's private Gradio cache and its janitor.

Gradio writes every upload (and every image or file it returns) into ``GRADIO_TEMP_DIR``. The demo
points that at a fresh directory of its own (mode 0700, ``deer-app-*`` inside ``GRADIO_TEMP_DIR``
or the system temp dir). Gradio keys an upload by its content hash, so identical uploads of several
requests share one path: a request must never delete "its" upload. Instead each request reads its
uploads' bytes into memory when it starts (`read`), and a janitor thread (`sweep`, every second)
deletes every file in the cache whose last upload (its mtime: Gradio moves each upload into place
anew) is older than `upload_ttl_s` (default `UPLOAD_TTL_S`), classified or not, and every file the demo
returned (`new_output`) after its own TTL. The run's public files (examples, curves; `set_public`) stay:
exactly the paths Gradio copies them to (`<cache>/<content hash>/<name>`), so an upload with an example's bytes
under another name is deleted like any other (only its path, not its bytes, would make it public).
The whole directory goes when the server closes or the process exits (`remove`). Gradio's own sweep
(``delete_cache``) is not used: an upload with an example's bytes lands on the example's path, and it
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
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "UPLOAD_TTL_S",
    "UploadGone",
    "cache_dir",
    "cached_path",
    "digest",
    "new_output",
    "read",
    "remove",
    "set_public",
    "sweep",
]

UPLOAD_TTL_S = 120.0  # every upload is deleted this long after it arrived (plus at most 1 s), classified or not
_DIR: Path | None = None
_OUTPUTS: list[tuple[float, Path]] = []  # (deadline, path) of files the demo returned
_PUBLIC: set[Path] = set()  # where Gradio keeps its copies of the run's public files, in the private cache
_LOCK = threading.Lock()
_SWEEPER: threading.Thread | None = None
_TTL = {"upload": UPLOAD_TTL_S}


class UploadGone(ValueError):
    """An upload no longer on disk (older than the upload TTL); the message is one line, meant for users."""


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


def cached_path(path: str | Path) -> Path:
    """Where Gradio keeps its copy of the file at `path` in the private cache (its `save_file_to_cache` rule)."""
    from gradio.processing_utils import hash_file
    from gradio_client.utils import strip_invalid_filename_characters

    return cache_dir() / hash_file(path) / strip_invalid_filename_characters(Path(path).name)


def set_public(paths: Iterable[str | Path | None], upload_ttl_s: float = UPLOAD_TTL_S) -> None:
    """Keep Gradio's copies of `paths` (the run's examples and curves), start the janitor with this TTL."""
    with _LOCK:
        _PUBLIC.update(cached_path(p) for p in paths if p)
        _TTL["upload"] = float(upload_ttl_s)
    _start_sweeper()


def read(path: str | Path, max_bytes: int) -> bytes:
    """An upload's bytes, read at once (the janitor may delete the file right after); UploadGone if gone."""
    try:
        with open(path, "rb") as fh:
            return fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise UploadGone(
            f"the upload is no longer on the server (uploads are deleted {_TTL['upload']:g} s after they arrive); "
            "upload the file again"
        ) from None


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
    folder = cache_dir() / secrets.token_hex(8)
    folder.mkdir()
    path = folder / name
    with _LOCK:
        _OUTPUTS.append((time.time() + ttl_s, path))
    _start_sweeper()
    return path


def sweep(now: float | None = None) -> None:
    """Delete returned files past their deadline and every other file (uploads, finished or aborted) whose
    mtime is more than the upload TTL ago, except the run's public files."""
    now = time.time() if now is None else now
    with _LOCK:
        due = [p for deadline, p in _OUTPUTS if deadline <= now]
        _OUTPUTS[:] = [(d, p) for d, p in _OUTPUTS if d > now]
        owned = {p for _, p in _OUTPUTS}
    for path in due:
        _delete(path)
    if _DIR is None or not _DIR.is_dir():
        return
    for path in list(_DIR.rglob("*")):
        try:
            stat = path.stat()
            if path.is_file() and path not in owned and now - stat.st_mtime > _TTL["upload"]:
                if path not in _PUBLIC:
                    _delete(path)
        except OSError:
            continue


def _start_sweeper() -> None:
    global _SWEEPER
    with _LOCK:
        if _SWEEPER is None or not _SWEEPER.is_alive():
            _SWEEPER = threading.Thread(target=_sweep_forever, name="deer-app-sweeper", daemon=True)
            _SWEEPER.start()


def _sweep_forever() -> None:
    while True:
        time.sleep(1.0)
        try:
            sweep()
        except Exception:  # noqa: BLE001 - the janitor must outlive a file vanishing under it
            continue


def remove() -> None:
    """Delete the private cache with everything in it (server closed, process exiting)."""
    with _LOCK:
        _OUTPUTS.clear()
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)
