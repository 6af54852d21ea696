"""The evaluation cache: one row per evaluated mask, stored as immutable Parquet parts (SPEC §4).

A run's ``evals/`` directory holds ``part-<unix_ns>-<uuid8>.parquet`` files, one per flush. Rows are
keyed by :func:`search_spaces.mask_key` (mask + model + calibration fingerprints), so a cache can be
shared by runs, resumed after a crash, and read by anything that reads Parquet. Nothing is pickled.
The schema, row checks and the reading and writing of one part live in :mod:`orchestrator.cache_parts`.
"""

from __future__ import annotations

import errno
import logging
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping

import pyarrow as pa

from .cache_parts import (PART_GLOB, SCHEMA, SCHEMA_VERSION, STALE_TMP_S, STATUSES, key_matches, normalize_row,
                          read_part, remove_stale_tmp, write_part)
from .files import remove

__all__ = ["SCHEMA", "SCHEMA_VERSION", "STATUSES", "CorruptPartWarning", "EvalCache", "ForeignRowWarning",
           "normalize_row", "read_part", "write_part"]

log = logging.getLogger("rayprune")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class CorruptPartWarning(RuntimeWarning):
    """A part could not be read; it was moved to ``quarantine/`` and the other parts were used."""


class ForeignRowWarning(RuntimeWarning):
    """Rows were not served: their key or fingerprints are not what they claim or what was asked."""


def _write_error(exc: OSError, directory: Path, rows: int) -> OSError:
    """The error :meth:`EvalCache.flush` raises when a part cannot be written (same errno, so the
    same OSError subclass): what happened, where, that the rows are buffered, and the fix."""
    kept = (f"{rows} computed row(s) are not on disk and are still buffered in memory; the next "
            f"flush() writes them. If this process ends first, rerun the same command: it resumes from "
            f"the cache and evaluates only the rows that are not on disk")
    if exc.errno in _DISK_FULL:
        return OSError(exc.errno, f"the disk holding the evaluation cache {directory} is full ({exc}): {kept}. "
                                  f"Free space on that disk (or move the run to a larger one)")
    return OSError(exc.errno, f"could not write a part to the evaluation cache {directory} "
                              f"({type(exc).__name__}: {exc}): {kept}. Make {directory} writable")


class EvalCache:
    """Evaluations of masks, keyed by mask key, persisted as immutable Parquet parts in ``directory``.

    Durability contract (the promise of Optuna's journal storage, kept in tests/orchestrator):

    - A part, once flushed, is never modified, and deleted only by :meth:`compact`, and only if its
      rows were all merged into this instance's memory and a part holding all of them is on disk.
      A part that was skipped (newer schema), has rows that were not served (see below) or could
      not be quarantined is never deleted. Each flush writes ONE new part to a dot-file, fsyncs it
      and renames it into place, so readers (which skip dot-files) never see a partial part; a
      crash leaves at most a stale ``.part-*.tmp`` behind, removed by the next instance to open
      the directory once it is older than ``STALE_TMP_S`` (younger ones may be a writer mid-flush).
    - With ``flush_every=1`` (default) every row is on disk when :meth:`add` returns, so nothing
      computed is lost by a crash. ``None`` flushes only on :meth:`flush` / leaving the ``with``.
      A flush that fails (disk full, read-only) raises an OSError naming the directory and the fix,
      and keeps the rows buffered for the next flush.
    - A part that cannot be read (torn, truncated, a page checksum that does not match) never hides
      the others: it is moved to ``directory/quarantine/`` with a :class:`CorruptPartWarning`
      naming it, and every other part is used. A part is used whole or not at all, except that
      a row whose key is not ``mask_key`` of its own mask and fingerprints (forged, corrupted) is
      never served: it is dropped with one :class:`ForeignRowWarning` per part.
    - :meth:`get` with ``model_fp`` / ``calibration_fp`` serves a row only if its fingerprints are
      those expected (else None and one ForeignRowWarning per part).
    - Rows are de-duplicated by key: the first "ok" row read wins (parts in name order, i.e. time
      order); an "ok" row beats any "failed" one. Only "ok" rows are hits (:meth:`get`,
      ``in``, ``len``); failures are kept for the driver's attempt cap (:meth:`get_failed`).
    - Several instances (processes) may share a directory; one sees another's flushed parts after
      :meth:`refresh`. Two writers evaluating the same key write equal results, so which wins
      does not matter.
    - Housekeeping (:meth:`compact`, stale dot-files) never raises for a file system that refuses:
      it warns and leaves the parts as they are.
    """

    def __init__(self, directory: str | Path, *, flush_every: int | None = 1) -> None:
        if flush_every is not None and (isinstance(flush_every, bool) or not isinstance(flush_every, int)
                                        or flush_every < 1):
            raise ValueError(f"flush_every={flush_every!r} must be a positive int (rows) or None (manual)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._ok: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, dict[str, Any]] = {}  # latest failure of keys with no ok row
        self._buffer: list[dict[str, Any]] = []
        self._merged: set[str] = set()  # parts whose rows are all in memory: the only ones compact() deletes
        self._kept: set[str] = set()  # parts looked at but not (wholly) merged: never deleted, not re-read
        self._origin: dict[str, str] = {}  # key of an ok row -> the part it came from ("" while buffered)
        self._warned: set[str] = set()  # parts already warned about by get()
        self._quarantined: list[Path] = []
        for stale in remove_stale_tmp(self.directory, STALE_TMP_S):
            log.info("removed %s, left by a flush that died more than %.0f s ago", stale, STALE_TMP_S)
        self.refresh()

    # ---- reading -------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Read parts that appeared since the last read (e.g. written by another process).

        Returns the number of rows read. Unreadable parts are quarantined with a warning.
        """
        count = 0
        for path in sorted(self.directory.glob(PART_GLOB)):
            if path.name in self._merged or path.name in self._kept or path.name.startswith("."):
                continue
            rows = self._read_or_quarantine(path)
            if rows is None:
                continue
            good = [row for row in rows if key_matches(row)]
            if len(good) < len(rows):
                warnings.warn(f"cache part {path}: {len(rows) - len(good)} of {len(rows)} rows have a key that "
                              f"is not the key of their own mask and fingerprints (forged or corrupted); "
                              f"they are not served, the part's other rows are. The part is kept as it is; "
                              f"delete it if it does not belong here", ForeignRowWarning, stacklevel=3)
                self._kept.add(path.name)
            else:
                self._merged.add(path.name)
            for row in good:
                self._index(row, path.name)
            count += len(good)
        return count

    def _read_or_quarantine(self, path: Path) -> list[dict[str, Any]] | None:
        try:
            rows = read_part(path)
        except FileNotFoundError:  # quarantined meanwhile by another instance
            return None
        except (OSError, pa.ArrowException, ValueError) as exc:
            self._quarantine(path, exc)
            return None
        newer = {r["schema_version"] for r in rows if r["schema_version"] > SCHEMA_VERSION}
        if newer:
            warnings.warn(f"cache part {path} has schema version {max(newer)} > {SCHEMA_VERSION}; "
                          f"skipped it (upgrade rayprune to read it)", RuntimeWarning, stacklevel=4)
            self._kept.add(path.name)  # not read, so never deleted by compact()
            return None
        return rows

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        target = self.directory / "quarantine" / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            path.replace(target)
        except FileNotFoundError:
            return
        except OSError as move_exc:  # e.g. a read-only directory: leave it, but never use it
            self._kept.add(path.name)
            warnings.warn(f"cache part {path} is unreadable ({type(exc).__name__}: {exc}) and could not be "
                          f"moved to {target} ({move_exc}); ignored it and used the other parts. Move or "
                          f"delete it by hand", CorruptPartWarning, stacklevel=5)
            return
        self._quarantined.append(target)
        warnings.warn(f"cache part {path} is unreadable ({type(exc).__name__}: {exc}); moved it to "
                      f"{target} and used the other parts", CorruptPartWarning, stacklevel=5)

    def _index(self, row: dict[str, Any], origin: str) -> None:
        key = row["key"]
        if row["status"] == "ok":
            if self._ok.setdefault(key, row) is row:
                self._origin[key] = origin
            self._failed.pop(key, None)
        elif key not in self._ok:
            self._failed[key] = row

    def get(self, key: str, *, model_fp: str | None = None, calibration_fp: str | None = None
            ) -> dict[str, Any] | None:
        """The "ok" row of ``key`` (a copy), or None when it was never evaluated successfully.

        With ``model_fp`` / ``calibration_fp``, also None when the row's fingerprints differ from
        them (a row of another model or window set must not be served), with one
        :class:`ForeignRowWarning` per part naming it.
        """
        row = self._ok.get(key)
        if row is None:
            return None
        expected = {"model_fp": model_fp, "calibration_fp": calibration_fp}
        wrong = {name: value for name, value in expected.items() if value is not None and row[name] != value}
        if wrong:
            self._warn_foreign(key, row, wrong)
            return None
        return dict(row)

    def _warn_foreign(self, key: str, row: dict[str, Any], wrong: dict[str, str]) -> None:
        origin = self._origin.get(key, "")
        if origin in self._warned:
            return
        self._warned.add(origin)
        where = f"cache part {self.directory / origin}" if origin else f"a row added to {self}"
        found = ", ".join(f"{name}={row[name]!r} (expected {value!r})" for name, value in wrong.items())
        warnings.warn(f"{where}: key {key[:16]}... has {found}; not served. The part belongs to another "
                      f"model or window set: delete it if it does not belong here", ForeignRowWarning,
                      stacklevel=4)

    def get_failed(self, key: str) -> dict[str, Any] | None:
        """The latest "failed" row of ``key`` (a copy), or None if it has none or has an ok row."""
        row = self._failed.get(key)
        return None if row is None else dict(row)

    def __contains__(self, key: object) -> bool:
        return key in self._ok

    def __len__(self) -> int:
        return len(self._ok)

    def rows(self, *, include_failed: bool = False) -> list[dict[str, Any]]:
        """One row per key (copies): the ok rows, plus the latest failure of keys without one."""
        chosen: Iterable[dict[str, Any]] = list(self._ok.values())
        if include_failed:
            chosen = [*chosen, *self._failed.values()]
        return [dict(row) for row in chosen]

    def stats(self) -> dict[str, int]:
        """Counts: ok keys, failed keys (no ok row), parts read or written (of them ``kept``: not
        wholly merged, never deleted), buffered rows, quarantined parts."""
        return {"ok": len(self._ok), "failed": len(self._failed), "parts": len(self._merged) + len(self._kept),
                "kept": len(self._kept), "buffered": len(self._buffer), "quarantined": len(self._quarantined)}

    # ---- writing -------------------------------------------------------------------------------
    def add(self, row: Mapping[str, Any]) -> bool:
        """Record one evaluation; False (and nothing stored) when ``row['key']`` already has an ok row.

        The row is checked at once (ValueError naming the field; a key that is not ``mask_key`` of
        the row's own mask and fingerprints is refused), visible to :meth:`get` at once,
        and on disk once ``flush_every`` rows are buffered.
        """
        clean = normalize_row(row)
        if not key_matches(clean):
            raise ValueError(f"cache row field 'key': {clean['key']!r} is not the key of the row's mask_json, "
                             f"model_fp and calibration_fp; compute it with search_spaces.mask_key(mask, "
                             f"model_fp, calibration_fp)")
        if clean["key"] in self._ok:
            return False
        self._index(clean, "")
        self._buffer.append(clean)
        if self.flush_every is not None and len(self._buffer) >= self.flush_every:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write the buffered rows as one new part; return its path (None when nothing was buffered).

        On failure nothing is visible on disk, the rows stay buffered, and an OSError with the same
        errno says so, naming the directory and the fix (disk full: free space; a rerun resumes).
        """
        if not self._buffer:
            return None
        try:
            path = write_part(self.directory, self._buffer)
        except OSError as exc:
            raise _write_error(exc, self.directory, len(self._buffer)) from exc
        for row in self._buffer:
            if self._origin.get(row["key"]) == "" and self._ok.get(row["key"]) is row:
                self._origin[row["key"]] = path.name
        self._merged.add(path.name)
        self._buffer = []
        return path

    def compact(self) -> Path | None:
        """Merge every part whose rows this instance holds into one; returns it (None: nothing done).

        The merged part (one row per key: the winners, plus failures of keys without an ok row) is
        written atomically before the merged parts are deleted, so a crash in between leaves
        duplicates that de-duplicate to the same rows. Parts not wholly merged (skipped, with rows
        not served) are never deleted. Call it when no other process writes here (a campaign holds
        its run directory's lock). It flushes first, raising as :meth:`flush` does (rows not on
        disk are not housekeeping); a merge the file system refuses (read-only, full) is warned
        about and returns None, the parts left as they are.
        """
        self.flush()
        merged = [p for p in sorted(self.directory.glob(PART_GLOB)) if p.name in self._merged]
        if len(merged) < 2:
            return None
        try:
            path = write_part(self.directory, self.rows(include_failed=True))
        except OSError as exc:
            warnings.warn(f"could not compact the evaluation cache {self.directory} ({type(exc).__name__}: "
                          f"{exc}); left its {len(merged)} parts as they are: no row is lost, reading is "
                          f"only slower", RuntimeWarning, stacklevel=2)
            return None
        self._merged.add(path.name)
        self._origin = dict.fromkeys(self._ok, path.name)
        for part in merged:
            try:
                remove(part)  # journaled, so a URI mirror deletes its copy too
            except OSError as exc:
                warnings.warn(f"could not delete {part} after compacting the evaluation cache into {path} "
                              f"({type(exc).__name__}: {exc}); the parts left hold duplicates of its rows, "
                              f"which read as the same rows", RuntimeWarning, stacklevel=2)
                return None
            self._merged.discard(part.name)
        return path

    def close(self) -> None:
        """Flush; the instance may still be used afterwards."""
        self.flush()

    def __enter__(self) -> EvalCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.flush()  # also on an exception: keep what was computed

    def __repr__(self) -> str:
        return f"EvalCache({str(self.directory)!r}, ok={len(self._ok)}, buffered={len(self._buffer)})"
