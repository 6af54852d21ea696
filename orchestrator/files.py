"""The one way rayprune's driver writes a file: whole or not at all, and durable once written.

:func:`atomic_write` writes to a dot-file beside the target (readers and the URI mirror skip
dot-files), fsyncs it, renames it into place and fsyncs the directory, so a crash at any moment
leaves the old file or the new one, never a torn one. :func:`write_via` does the same for writers
that need a file handle (Parquet, CSV, safetensors).

:func:`remove` is the one way a run's own file is deleted on purpose (e.g. cache parts merged by
compaction): the name goes to the directory's ``.removed`` journal first, and the URI mirror
deletes a remote file only when it is named there. A file that is merely missing locally (a
cleaned staging directory) is never deleted remotely.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_via(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Create ``path`` atomically from what ``write(handle)`` writes to a binary handle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return path


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically and durably."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_via(path, lambda handle: handle.write(payload))


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """``data`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


#: The journal of files a run deleted on purpose, one name per line, per directory (a dot-file).
REMOVED = ".removed"


def remove(path: str | os.PathLike[str]) -> None:
    """Delete ``path`` on purpose: journal its name in ``.removed`` (fsynced), then unlink it."""
    path = Path(path)
    with open(path.parent / REMOVED, "a", encoding="utf-8") as journal:
        journal.write(path.name + "\n")
        journal.flush()
        os.fsync(journal.fileno())
    path.unlink(missing_ok=True)
