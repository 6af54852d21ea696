"""The evaluation cache's durability promise, "nothing lost, nothing wrong served", under the faults
that break it: parts it refused to read, a file system that refuses housekeeping or is full, crash
debris, rows of another model under this campaign's keys, and flipped bits in a part.
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import orchestrator.cache as cache_module
import orchestrator.files as files_module
from orchestrator.cache import SCHEMA, SCHEMA_VERSION, CorruptPartWarning, EvalCache, normalize_row, write_part
from orchestrator.scorer import Scorer
from search_spaces import Block, Mask, mask_key
from tests.orchestrator.test_cache import CALIB_FP, MODEL_FP, make_row


def parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def ppl_by_key(cache: EvalCache) -> dict[str, float]:
    return {row["key"]: row["ppl"] for row in cache.rows()}


# ---- 1. compaction deletes only what it merged --------------------------------------------------
def test_compact_keeps_a_part_it_did_not_read(tmp_path):
    """A part of a newer schema is skipped, so its rows are not in memory: compact() must keep it."""
    cache = EvalCache(tmp_path)
    cache.add(make_row(0))
    cache.add(make_row(1))
    newer = tmp_path / "part-1-00000000.parquet"
    row = normalize_row(make_row(5, schema_version=SCHEMA_VERSION + 1))
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), newer)
    original = newer.read_bytes()
    with pytest.warns(RuntimeWarning, match="schema version"):
        reader = EvalCache(tmp_path)
    assert make_row(5)["key"] not in reader
    merged = reader.compact()
    assert merged is not None and sorted(parts(tmp_path)) == sorted([newer, merged])
    assert newer.read_bytes() == original  # byte for byte
    with pytest.warns(RuntimeWarning, match=f"{re.escape(str(newer))}.*schema version"):
        again = EvalCache(tmp_path)  # still there, still warned about
    assert len(again) == 2 and again.compact() is None  # only one part of its own to merge


# ---- 2. housekeeping never aborts finished work -------------------------------------------------
def _refuse_write(monkeypatch):
    def refuse(directory, rows, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_module, "write_part", refuse)


def _refuse_unlink(monkeypatch):
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.name.startswith("part-"):  # a visible part: the directory refuses
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)


@pytest.mark.parametrize("refuse", [_refuse_write, _refuse_unlink], ids=["write-refused", "unlink-refused"])
def test_compact_on_a_read_only_directory_warns_and_loses_nothing(tmp_path, monkeypatch, refuse):
    cache = EvalCache(tmp_path)
    for layer in range(3):
        cache.add(make_row(layer, ppl=10.0 + layer))
    before = {p.name: p.read_bytes() for p in parts(tmp_path)}
    refuse(monkeypatch)
    with pytest.warns(RuntimeWarning, match=re.escape(str(tmp_path))):
        assert cache.compact() is None
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in parts(tmp_path)}
    assert {name: after[name] for name in before} == before  # nothing deleted, nothing changed
    assert ppl_by_key(EvalCache(tmp_path)) == ppl_by_key(cache) and len(cache) == 3
    assert cache.compact() is not None and len(parts(tmp_path)) == 1  # once allowed, it compacts


class _FullDisk(io.FileIO):
    """A file on a full disk: the first bytes go through, then ENOSPC."""

    def write(self, data) -> int:
        if self.tell() > 64:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_flush_on_a_full_disk_keeps_rows_and_says_so(tmp_path, monkeypatch):
    cache = EvalCache(tmp_path, flush_every=None)
    cache.add(make_row(0))
    cache.add(make_row(1))
    monkeypatch.setattr(files_module, "open", lambda path, mode: _FullDisk(path, mode), raising=False)
    with pytest.raises(OSError) as caught:
        cache.flush()
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert "full" in message and str(tmp_path) in message  # what and where
    assert "2 computed row(s)" in message and "buffered in memory" in message  # what is at stake
    assert "Free space" in message and "rerun" in message  # the fix
    assert list(tmp_path.iterdir()) == [] and cache.stats()["buffered"] == 2  # no dot-file left either
    monkeypatch.undo()
    cache.flush()
    assert len(EvalCache(tmp_path)) == 2


def test_stale_dot_files_are_removed_and_fresh_ones_left(tmp_path):
    EvalCache(tmp_path).add(make_row(0))
    stale = tmp_path / ".part-1700000000000000000-abcdef12.parquet.4242-deadbeef.tmp"
    fresh = tmp_path / ".part-1700000000000000001-abcdef13.parquet.4243-cafebabe.tmp"
    other = tmp_path / ".config.yaml.4242-deadbeef.tmp"  # not the cache's to remove
    for path in (stale, fresh, other):
        path.write_bytes(b"PAR1 half a part")
    two_hours_ago = time.time() - 7200
    for path in (stale, other):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert len(EvalCache(tmp_path)) == 1
    assert not stale.exists() and fresh.exists() and other.exists()


def test_a_corrupt_part_that_cannot_be_moved_is_ignored_and_kept(tmp_path, monkeypatch):
    cache = EvalCache(tmp_path)
    cache.add(make_row(0))
    cache.add(make_row(1))
    torn = tmp_path / "part-0-deadbeef.parquet"
    torn.write_bytes(b"not parquet at all")

    def refuse(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "replace", refuse)
    with pytest.warns(CorruptPartWarning, match="could not be moved"):
        reader = EvalCache(tmp_path)
    assert len(reader) == 2 and reader.compact() is not None
    assert torn.read_bytes() == b"not parquet at all"  # not read, so not deleted


# ---- 3. a hit is served only if the row is what it claims -------------------------------------
def test_rows_of_another_model_under_this_campaigns_keys_are_not_served(tmp_path):
    forged = [normalize_row(make_row(layer, ppl=1.01) | {"model_fp": "another-model"}) for layer in range(3)]
    forged_part = write_part(tmp_path, forged)  # this campaign's keys, another model, made-up ppl
    with pytest.warns(RuntimeWarning, match=re.escape(str(forged_part))):
        EvalCache(tmp_path).add(make_row(7, ppl=17.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = EvalCache(tmp_path)
        for layer in range(3):
            key = make_row(layer)["key"]
            assert cache.get(key) is None and key not in cache
            assert cache.get(key, model_fp=MODEL_FP, calibration_fp=CALIB_FP) is None
    about_forged = [w for w in caught if str(forged_part) in str(w.message)]
    assert len(about_forged) == 1 and issubclass(about_forged[0].category, RuntimeWarning)  # once per part
    good = cache.get(make_row(7)["key"], model_fp=MODEL_FP, calibration_fp=CALIB_FP)
    assert good is not None and good["ppl"] == 17.0
    assert len(cache) == 1 and forged_part.exists()  # nothing quarantined, nothing deleted


def test_get_checks_the_expected_fingerprints(tmp_path):
    EvalCache(tmp_path).add(make_row(0, ppl=12.0))
    cache = EvalCache(tmp_path)
    key = make_row(0)["key"]
    assert cache.get(key, model_fp=MODEL_FP, calibration_fp=CALIB_FP)["ppl"] == 12.0
    with pytest.warns(cache_module.ForeignRowWarning, match=re.escape(str(parts(tmp_path)[0]))):
        assert cache.get(key, model_fp="another-model", calibration_fp=CALIB_FP) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per part
        assert cache.get(key, model_fp=MODEL_FP, calibration_fp="other-windows") is None
    assert cache.get(key)["ppl"] == 12.0  # no expectation: served


def test_add_rejects_a_key_that_is_not_the_rows_own(tmp_path):
    cache = EvalCache(tmp_path)
    with pytest.raises(ValueError, match="key"):
        cache.add(make_row(0) | {"model_fp": "another-model"})
    assert len(cache) == 0 and parts(tmp_path) == []


def test_scorer_asks_for_its_own_fingerprints(tmp_path, monkeypatch):
    EvalCache(tmp_path).add(make_row(0, ppl=12.0))
    forged = normalize_row(make_row(1, ppl=1.01) | {"model_fp": "another-model"})
    write_part(tmp_path, [forged])
    asked: list[dict] = []
    real_get = EvalCache.get
    monkeypatch.setattr(EvalCache, "get", lambda self, key, **kw: (asked.append(kw), real_get(self, key, **kw))[1])
    dispatched: list = []
    dispatcher = SimpleNamespace(actors=[object()], run=lambda tasks: dispatched.extend(tasks) or iter(()))
    arch = SimpleNamespace(num_blocks=8, num_layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = Scorer(EvalCache(tmp_path), dispatcher, arch, MODEL_FP, {"calibration": CALIB_FP})
    masks = [Mask().remove(Block(layer, "attn")) for layer in (0, 1)]
    assert scorer.cached(masks[0], "calibration") == 12.0
    assert scorer.cached(masks[1], "calibration") is None  # the forged row is not served
    assert scorer.score(masks[:1], None, "calibration", "test") == {masks[0]: 12.0}
    assert dispatched == []
    assert asked and all(kw == {"model_fp": MODEL_FP, "calibration_fp": CALIB_FP} for kw in asked)


# ---- 4. bit rot is detected ------------------------------------------------------------------------
def test_flipped_bits_in_the_ppl_pages_never_change_a_value(tmp_path):
    source = EvalCache(tmp_path / "source", flush_every=None)
    for layer in range(12):
        source.add(make_row(layer, ppl=10.0 + 0.123456789 * layer))
    part = source.flush()
    original = ppl_by_key(source)
    column = pq.ParquetFile(part).metadata.row_group(0).column(SCHEMA.names.index("ppl"))
    assert column.path_in_schema == "ppl"
    start = min(o for o in (column.dictionary_page_offset, column.data_page_offset) if o is not None)
    length = column.total_compressed_size
    data = part.read_bytes()
    outcomes = {"quarantined": 0, "intact": 0}
    for i in range(20):
        offset = start + (i * (length - 1)) // 19
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (i % 8)
        directory = tmp_path / f"flip{i}"
        directory.mkdir()
        (directory / part.name).write_bytes(bytes(flipped))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = EvalCache(directory)
        if (directory / "quarantine" / part.name).exists():
            assert any(issubclass(w.category, CorruptPartWarning) for w in caught)
            assert len(cache) == 0
            outcomes["quarantined"] += 1
        else:
            got = ppl_by_key(cache)
            assert got == original, f"bit {i % 8} of byte {offset} silently changed a ppl"
            outcomes["intact"] += 1
    assert outcomes["quarantined"] > 0, outcomes


def test_parts_without_checksums_are_still_read(tmp_path):
    rows = [normalize_row(make_row(layer, ppl=10.0 + layer)) for layer in range(3)]
    old = tmp_path / "part-1-00000000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), old, write_page_checksum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = EvalCache(tmp_path)
    assert ppl_by_key(cache) == {row["key"]: row["ppl"] for row in rows}
    assert all(math.isfinite(ppl) for ppl in ppl_by_key(cache).values())
    cache.add(make_row(5))
    assert cache.compact() is not None and len(EvalCache(tmp_path)) == 4  # and merged like any other


def test_mask_key_is_what_the_rows_carry():
    row = make_row(3)
    assert row["key"] == mask_key(Mask.from_json(row["mask_json"]), row["model_fp"], row["calibration_fp"])
