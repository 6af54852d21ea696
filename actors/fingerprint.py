"""A content fingerprint of a Hugging Face model directory that covers every weight byte.

Cached evaluations are keyed by the model's fingerprint, so two directories get the same
fingerprint exactly when they hold the same model. :func:`model_fingerprint` hashes:

- ``config.json`` as canonical JSON (sorted keys, no whitespace), without ``transformers_version``
  (re-saving with another transformers release changes no weight);
- for every ``*.safetensors`` file, sorted by name: the name, the size in bytes and the sha256 of
  the *whole* file, read in 8 MiB chunks.

Every byte counts: a copy of a model with one middle tensor changed in place (same config, same
sizes) is a different model and gets a different fingerprint. The file's directory does not count:
the same files in two directories give the same fingerprint.

Cost: reading and hashing every byte once, about 140 GB for a 70B checkpoint in fp16 (minutes: the
disk or sha256, a few hundred MB/s to a few GB/s per core, whichever is slower; shards are hashed
on up to four threads). ``bench/fingerprint_cost.py`` measures it on the machine at hand.

Because every actor start calls it, each file's digest is cached in
``actors.models.cache_dir() / "fingerprints.json"``::

    {"version": 2,
     "files": {"/real/path/model.safetensors":
                   {"size": 269060552, "mtime_ns": ..., "ctime_ns": ..., "inode": ..., "device": ...,
                    "sha256": "<64 hex>"}}}

keyed by the file's real path (symlinks resolved, as in the hub's cache). A cached digest is used
only while the file's ``os.stat`` still shows the same size, mtime_ns, ctime_ns, inode and device;
any change (a rewrite, ``touch``, a copy over it, even a rewrite whose mtime was set back, which
still moves ctime) means the file is hashed again. Two more rules keep the cache honest:

- a file whose mtime or ctime is less than :data:`SETTLE_SECONDS` before hashing began is hashed
  but not cached: a write landing later in the same timestamp tick would leave its stat unchanged
  (git's "racily clean" problem; 2 s covers filesystems with coarse timestamps). Such a file is
  hashed on every call until it has settled;
- a file whose stat changes while it is hashed is hashed again (a few times), then refused.

The cache file is read with ``json`` only and written atomically (a temporary file in the same
directory, then ``os.replace``), merged with the file as it is just before the write (two
processes writing at the same moment may still lose each other's new entries: a rehash later, never
a wrong digest); entries whose file is gone or has changed are dropped on each write, so the cache
stays as small as the models on the machine. A cache that cannot be read (corrupt, truncated, another format) is ignored and its
digests recomputed; one that cannot be written costs a warning and a rehash next time, never a
wrong fingerprint.

This scheme (v2) replaced a cheaper one that hashed only the first and last MiB of each file and
missed in-place edits in between. The new values differ from the old ones, so evaluations and
latency tables cached under old fingerprints miss once and are recomputed: correctness first.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["model_fingerprint", "SETTLE_SECONDS", "CACHE_NAME"]

#: File name of the digest cache under ``actors.models.cache_dir()``.
CACHE_NAME = "fingerprints.json"
#: A file whose mtime or ctime is less than this many seconds before hashing began is not cached.
SETTLE_SECONDS = 2.0

_SCHEME = b"rayprune model fingerprint v2\n"
_CACHE_VERSION = 2
_CHUNK = 8 << 20
_THREADS = 4
_ATTEMPTS = 3
_STAT_FIELDS = ("size", "mtime_ns", "ctime_ns", "inode", "device")


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 hex of ``path``'s canonical config.json and every byte of its safetensors files.

    Equal for equal content wherever it lies; different when any weight byte, any file name or the
    config (but ``transformers_version``) differs. Unchanged files are answered from the digest
    cache (see the module docstring), so only the first call on a model reads all its weights.

    Raises ValueError when ``path`` has no config.json or no ``*.safetensors`` file, and
    RuntimeError when a weight file keeps changing while it is hashed.
    """
    path = Path(path)
    config_file = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config_file.is_file() or not weights:
        raise ValueError(
            f"{path} is not a safetensors model directory (needs config.json and *.safetensors); "
            "resolve the model with actors.models.resolve_model first."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("transformers_version", None)
    digests = _file_digests(weights)
    digest = hashlib.sha256(_SCHEME)
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for file in weights:
        size, sha = digests[file]
        digest.update(json.dumps([file.name, size, sha], separators=(",", ":")).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- digests of files


def _file_digests(files: list[Path]) -> dict[Path, tuple[int, str]]:
    """``file -> (size, sha256 hex)`` for each file: from the cache where its stat is unchanged,
    hashed otherwise (and then cached when it has settled)."""
    cache_file = _cache_file()
    cached = _read_cache(cache_file)
    started_ns = time.time_ns()
    result: dict[Path, tuple[int, str]] = {}
    todo: list[tuple[Path, str]] = []
    for file in files:
        real = os.path.realpath(file)
        entry = cached.get(real)
        stat = _stat(real)
        if entry is not None and all(entry[k] == stat[k] for k in _STAT_FIELDS):
            result[file] = (stat["size"], entry["sha256"])
        else:
            todo.append((file, real))
    if not todo:
        return result
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(todo), os.cpu_count() or 1)) as pool:
        hashed = list(pool.map(lambda item: _hash_stable(item[1]), todo))
    fresh: dict[str, dict[str, Any]] = {}
    settled_before = started_ns - int(SETTLE_SECONDS * 1e9)
    for (file, real), (stat, sha) in zip(todo, hashed):
        result[file] = (stat["size"], sha)
        if max(stat["mtime_ns"], stat["ctime_ns"]) < settled_before:
            fresh[real] = {**stat, "sha256": sha}
    if fresh:
        _write_cache(cache_file, fresh)
    return result


def _stat(real: str) -> dict[str, int]:
    """The fields of ``os.stat`` that must all be unchanged for a cached digest to be used."""
    st = os.stat(real)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _hash_stable(real: str) -> tuple[dict[str, int], str]:
    """``(stat, sha256 hex)`` of ``real``, the stat the same before and after reading it."""
    for _ in range(_ATTEMPTS):
        before = _stat(real)
        sha = _sha256_file(real)
        if _stat(real) == before:
            return before, sha
    raise RuntimeError(
        f"{real} changed while it was being hashed ({_ATTEMPTS} attempts); wait until whatever is "
        "writing the model has finished, then start again."
    )


def _sha256_file(real: str) -> str:
    """sha256 hex of every byte of ``real``, read in 8 MiB chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(real, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# --------------------------------------------------------------------------- the digest cache


def _cache_file() -> Path:
    from .models import cache_dir

    return cache_dir() / CACHE_NAME


def _read_cache(cache_file: Path) -> dict[str, dict[str, Any]]:
    """The valid entries of ``cache_file``; ``{}`` when it is missing, unreadable or not ours.

    A corrupt file (a crash, a foreign writer, another version) costs a rehash, never an error;
    entries of the wrong shape are skipped one by one.
    """
    try:
        data = json.loads(cache_file.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {real: entry for real, entry in data["files"].items() if _valid_entry(entry)}


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    if not all(type(entry.get(k)) is int for k in _STAT_FIELDS):
        return False
    sha = entry.get("sha256")
    return isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)


def _still_current(real: str, entry: dict[str, Any]) -> bool:
    try:
        stat = _stat(real)
    except OSError:
        return False
    return all(entry[k] == stat[k] for k in _STAT_FIELDS)


def _write_cache(cache_file: Path, fresh: dict[str, dict[str, Any]]) -> None:
    """Merge ``fresh`` into the cache as it is on disk now, drop entries whose file is gone or has
    changed, and replace the file atomically. Failure to write is a warning: the fingerprint is
    right either way, the next call just hashes again."""
    files = {real: entry for real, entry in _read_cache(cache_file).items() if _still_current(real, entry)}
    files.update(fresh)
    text = json.dumps({"version": _CACHE_VERSION, "files": dict(sorted(files.items()))}, indent=1)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{CACHE_NAME}.", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, cache_file)
        tmp = None
    except OSError as error:
        warnings.warn(
            f"could not write the model fingerprint cache {cache_file} ({error}); fingerprints stay "
            "correct but every call rehashes the weights. Make its directory writable or point "
            "RAYPRUNE_CACHE at a writable directory.",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
