"""The evaluation cache: one row per evaluated mask, stored as immutable Parquet parts (SPEC §4).

A run's ``evals/`` directory holds ``part-<unix_ns>-<uuid8>.parquet`` files, one per flush. Rows are
keyed by :func:`search_spaces.mask_key` (mask + model + calibration fingerprints), so a cache can be
shared by runs, resumed after a crash, and read by anything that reads Parquet. Nothing is pickled.
"""

from __future__ import annotations

import numbers
import os
import time
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from .files import write_via

__all__ = ["SCHEMA", "SCHEMA_VERSION", "STATUSES", "CorruptPartWarning", "EvalCache", "normalize_row",
           "read_part", "write_part"]

SCHEMA_VERSION = 1
STATUSES: tuple[str, ...] = ("ok", "failed")

#: Columns of every part. ``time`` is float unix seconds; ppl may be NaN or inf (they are data).
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # mask_key(mask, model_fp, calibration_fp)
        pa.field("mask_json", pa.string(), nullable=False),  # Mask.to_json()
        pa.field("model_fp", pa.string(), nullable=False),
        pa.field("calibration_fp", pa.string(), nullable=False),
        pa.field("nll_sum", pa.float64()),  # summed token NLL over the calibration set
        pa.field("tokens", pa.int64()),  # predicted tokens summed over
        pa.field("ppl", pa.float64()),  # exp(nll_sum / tokens)
        pa.field("params_kept", pa.int64()),
        pa.field("ratio", pa.float64()),
        pa.field("latency_est", pa.float64()),
        pa.field("seconds", pa.float64()),  # wall time of the evaluation
        pa.field("worker", pa.string()),
        pa.field("time", pa.float64(), nullable=False),  # unix seconds when the row was added
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "failed"
        pa.field("error", pa.string()),  # why a failed evaluation failed
    ],
    metadata={"rayprune.cache.schema_version": str(SCHEMA_VERSION)},
)
_REQUIRED = ("key", "mask_json", "model_fp", "calibration_fp", "status")
_REQUIRED_OK = ("nll_sum", "tokens", "ppl")  # an "ok" row without these would be a hit with no value
_PART_GLOB = "part-*.parquet"


class CorruptPartWarning(RuntimeWarning):
    """A part could not be read; it was moved to ``quarantine/`` and the other parts were used."""


# ---- rows ---------------------------------------------------------------------------------------
def _column_value(name: str, kind: pa.DataType, value: Any) -> Any:
    """``value`` as the plain Python value column ``name`` stores; ValueError naming the field."""
    if value is None:
        return None
    if pa.types.is_string(kind) and isinstance(value, str):
        return value
    if pa.types.is_integer(kind) and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if pa.types.is_floating(kind) and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    expected = {"string": "a str", "double": "a float"}.get(str(kind), "an int")
    raise ValueError(f"cache row field {name!r}: {value!r} is not {expected}; pass {expected} or None")


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A complete, typed row from ``row``: defaults filled (time, schema_version), fields checked.

    Raises ValueError naming the field for unknown fields, missing required fields, wrong types or
    a bad status. The result is exactly what reading the row back from Parquet gives.
    """
    unknown = sorted(set(row) - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"cache row has unknown fields {unknown}; the columns are {SCHEMA.names}")
    full = {"time": time.time(), "schema_version": SCHEMA_VERSION, **row}
    clean = {f.name: _column_value(f.name, f.type, full.get(f.name)) for f in SCHEMA}
    if clean["status"] not in STATUSES:
        raise ValueError(f"cache row field 'status': {clean['status']!r} is not one of {STATUSES}")
    required = _REQUIRED + (_REQUIRED_OK if clean["status"] == "ok" else ())
    missing = [name for name in required if clean[name] is None]
    if missing:
        raise ValueError(f"cache row ({clean['status']}) lacks {missing}; set them (they may not be None)")
    return clean


# ---- parts --------------------------------------------------------------------------------------
def write_part(directory: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as one new part (:func:`orchestrator.files.write_via`: dot-file, fsync, rename,
    fsync dir). A reader never sees a partial part: until the rename its name starts with a dot."""
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return write_via(directory / name, lambda handle: pq.write_table(table, handle))


def read_part(path: Path) -> list[dict[str, Any]]:
    """All rows of one part, or an exception (OSError / ArrowException / ValueError) if unreadable."""
    table = pq.read_table(path)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a rayprune cache part: columns {missing} are missing")
    return table.select(SCHEMA.names).cast(SCHEMA).to_pylist()


# ---- the cache ----------------------------------------------------------------------------------
class EvalCache:
    """Evaluations of masks, keyed by mask key, persisted as immutable Parquet parts in ``directory``.

    Durability contract (the promise of Optuna's journal storage, kept in tests/orchestrator):

    - A part, once flushed, is never modified, and deleted only by :meth:`compact`, after a part
      holding all of its rows is on disk. Each flush writes ONE new part to a dot-file, fsyncs it
      and renames it into place, so readers (which skip dot-files) never see a partial part; a
      crash leaves at most a stale ``.part-*.tmp`` behind, ignored.
    - With ``flush_every=1`` (default) every row is on disk when :meth:`add` returns, so nothing
      computed is lost by a crash. ``None`` flushes only on :meth:`flush` / leaving the ``with``.
    - A part that cannot be read (torn, truncated, corrupt) never hides the others: it is moved to
      ``directory/quarantine/`` with a :class:`CorruptPartWarning` naming it, and every other part
      is used. A part is used whole or not at all.
    - Rows are de-duplicated by key: the first "ok" row read wins (parts in name order, i.e. time
      order); an "ok" row beats any "failed" one. Only "ok" rows are hits (:meth:`get`,
      ``in``, ``len``); failures are kept for the driver's attempt cap (:meth:`get_failed`).
    - Several instances (processes) may share a directory; one sees another's flushed parts after
      :meth:`refresh`. Two writers evaluating the same key write equal results, so which wins
      does not matter.
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
        self._parts: set[str] = set()  # names of parts already read (or written) by this instance
        self._quarantined: list[Path] = []
        self.refresh()

    # ---- reading -------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Read parts that appeared since the last read (e.g. written by another process).

        Returns the number of rows read. Unreadable parts are quarantined with a warning.
        """
        count = 0
        for path in sorted(self.directory.glob(_PART_GLOB)):
            if path.name in self._parts or path.name.startswith("."):
                continue
            rows = self._read_or_quarantine(path)
            if rows is None:
                continue
            self._parts.add(path.name)
            for row in rows:
                self._index(row)
            count += len(rows)
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
                          f"skipped it (upgrade rayprune to read it)", RuntimeWarning, stacklevel=3)
            self._parts.add(path.name)
            return None
        return rows

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        target = self.directory / "quarantine" / path.name
        target.parent.mkdir(exist_ok=True)
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return
        self._quarantined.append(target)
        warnings.warn(f"cache part {path} is unreadable ({type(exc).__name__}: {exc}); moved it to "
                      f"{target} and used the other parts", CorruptPartWarning, stacklevel=4)

    def _index(self, row: dict[str, Any]) -> None:
        key = row["key"]
        if row["status"] == "ok":
            self._ok.setdefault(key, row)
            self._failed.pop(key, None)
        elif key not in self._ok:
            self._failed[key] = row

    def get(self, key: str) -> dict[str, Any] | None:
        """The "ok" row of ``key`` (a copy), or None when it was never evaluated successfully."""
        row = self._ok.get(key)
        return None if row is None else dict(row)

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
        """Counts: ok keys, failed keys (no ok row), parts read or written, buffered, quarantined."""
        return {"ok": len(self._ok), "failed": len(self._failed), "parts": len(self._parts),
                "buffered": len(self._buffer), "quarantined": len(self._quarantined)}

    # ---- writing -------------------------------------------------------------------------------
    def add(self, row: Mapping[str, Any]) -> bool:
        """Record one evaluation; False (and nothing stored) when ``row['key']`` already has an ok row.

        The row is checked at once (ValueError naming the field), visible to :meth:`get` at once,
        and on disk once ``flush_every`` rows are buffered.
        """
        clean = normalize_row(row)
        if clean["key"] in self._ok:
            return False
        self._index(clean)
        self._buffer.append(clean)
        if self.flush_every is not None and len(self._buffer) >= self.flush_every:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write the buffered rows as one new part; return its path (None when nothing was buffered).

        On failure (e.g. disk full) nothing is visible on disk and the rows stay buffered.
        """
        if not self._buffer:
            return None
        path = write_part(self.directory, self._buffer)
        self._parts.add(path.name)
        self._buffer = []
        return path

    def compact(self) -> Path | None:
        """Merge every part this instance has read or written into one; returns it (None: nothing to do).

        The merged part (one row per key: the winners, plus failures of keys without an ok row) is
        written atomically before the merged parts are deleted, so a crash in between leaves
        duplicates that de-duplicate to the same rows. Call it when no other process writes here
        (a campaign holds its run directory's lock).
        """
        self.flush()
        merged = [p for p in sorted(self.directory.glob(_PART_GLOB))
                  if p.name in self._parts and not p.name.startswith(".")]
        if len(merged) < 2:
            return None
        path = write_part(self.directory, self.rows(include_failed=True))
        self._parts.add(path.name)
        for part in merged:
            part.unlink(missing_ok=True)
            self._parts.discard(part.name)
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
