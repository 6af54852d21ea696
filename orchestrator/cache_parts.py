"""Rows and parts of the evaluation cache (SPEC §4): the schema, row checks, and one part on disk.

:mod:`orchestrator.cache` (``EvalCache``) decides what to read, serve, merge and delete; this
module only knows what a valid row is and how one part is written and read. A part is written
with Parquet page checksums (CRC32 of every page) and read with their verification, so a flipped
bit in a page is an unreadable part, never a silently changed value. Parts written before
checksums existed carry none and are read as before. Nothing is pickled.
"""

from __future__ import annotations

import numbers
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from search_spaces import Mask, mask_key

from .files import write_via

__all__ = ["PART_GLOB", "SCHEMA", "SCHEMA_VERSION", "STALE_TMP_S", "STATUSES", "key_matches", "normalize_row",
           "read_part", "remove_stale_tmp", "write_part"]

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
PART_GLOB = "part-*.parquet"
#: What :func:`orchestrator.files.write_via` leaves behind when a flush dies before its rename
#: (``.part-<ns>-<uuid8>.parquet.<pid>-<hex>.tmp``).
STALE_TMP_GLOB = ".part-*.tmp"
#: A dot-file older than this (seconds) belongs to no live flush: a flush takes well under a minute.
STALE_TMP_S = 3600.0


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


def key_matches(row: Mapping[str, Any]) -> bool:
    """Whether ``row['key']`` is the key of the row's own mask and fingerprints.

    False for a forged or corrupted row (a key copied onto another mask or another model's result,
    or a ``mask_json`` that is not a mask): such a row must not be served under that key.
    """
    try:
        mask = Mask.from_json(row["mask_json"])
        return row["key"] == mask_key(mask, row["model_fp"], row["calibration_fp"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return False


# ---- parts --------------------------------------------------------------------------------------
def write_part(directory: Path, rows: list[dict[str, Any]], *, checksums: bool = True) -> Path:
    """Write ``rows`` as one new part (:func:`orchestrator.files.write_via`: dot-file, fsync, rename,
    fsync dir). A reader never sees a partial part: until the rename its name starts with a dot.

    ``checksums`` writes a CRC32 into every page header (``False`` only to write parts the way
    rayprune did before, for tests and the benchmark).
    """
    name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return write_via(directory / name,
                     lambda handle: pq.write_table(table, handle, write_page_checksum=checksums))


def read_part(path: Path) -> list[dict[str, Any]]:
    """All rows of one part, or an exception (OSError / ArrowException / ValueError) if unreadable.

    Page checksums are verified where the part has them: a mismatch raises (a corrupt part).
    """
    table = pq.read_table(path, page_checksum_verification=True)
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a rayprune cache part: columns {missing} are missing")
    return table.select(SCHEMA.names).cast(SCHEMA).to_pylist()


def remove_stale_tmp(directory: Path, max_age_s: float = STALE_TMP_S) -> list[Path]:
    """Delete the dot-files of flushes that died before their rename, if older than ``max_age_s``.

    Younger ones may belong to a writer in mid-flush and are left alone. Housekeeping only: a file
    that cannot be examined or removed (read-only directory, raced by another cleaner) is skipped.
    Returns the paths removed.
    """
    removed = []
    cutoff = time.time() - max_age_s
    for path in directory.glob(STALE_TMP_GLOB):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed
