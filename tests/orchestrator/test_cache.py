"""The evaluation cache: a contract any implementation must keep, then the Parquet-part specifics.

The contract is one test body per behaviour, run against every implementation in
``IMPLEMENTATIONS`` (the way Optuna runs one storage suite against every storage).
"""

from __future__ import annotations

import ast
import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import orchestrator.cache as cache_module
import orchestrator.cache_parts as cache_parts_module
from orchestrator.cache import SCHEMA, SCHEMA_VERSION, CorruptPartWarning, EvalCache
from search_spaces import Block, Mask, mask_key

IMPLEMENTATIONS = [pytest.param(EvalCache, id="parquet")]
MODEL_FP, CALIB_FP = "model-fp", "calib-fp"


def make_row(layer: int, ppl: float = 10.0, status: str = "ok", **extra: Any) -> dict[str, Any]:
    """A realistic row: the mask without attention block ``layer``."""
    mask = Mask().remove(Block(layer, "attn"))
    row = {"key": mask_key(mask, MODEL_FP, CALIB_FP), "mask_json": mask.to_json(), "model_fp": MODEL_FP,
           "calibration_fp": CALIB_FP, "status": status, "worker": "actor-0", "seconds": 1.5}
    if status == "ok":
        row |= {"nll_sum": math.log(ppl) * 512 if math.isfinite(ppl) and ppl > 0 else ppl, "tokens": 512,
                "ppl": ppl, "params_kept": 120_000_000, "ratio": 0.1, "latency_est": None}
    else:
        row |= {"error": "RayActorError: actor died"}
    return row | extra


@pytest.fixture(params=IMPLEMENTATIONS)
def open_cache(request, tmp_path: Path) -> Callable[..., EvalCache]:
    """Opens a cache (a new instance each call) on one shared directory."""
    return lambda **kwargs: request.param(tmp_path / "evals", **kwargs)


class TestCacheContract:
    def test_round_trip_of_rows(self, open_cache):
        rows = [make_row(layer, ppl=10.0 + layer) for layer in range(4)]
        with open_cache(flush_every=None) as cache:
            assert all(cache.add(row) for row in rows)
            assert len(cache) == 4 and rows[0]["key"] in cache
        reopened = open_cache()
        for row in rows:
            got = reopened.get(row["key"])
            assert got == {"error": None, **row, "time": got["time"], "schema_version": SCHEMA_VERSION}
            assert isinstance(got["time"], float)
        assert sorted(r["key"] for r in reopened.rows()) == sorted(r["key"] for r in rows)

    def test_get_before_and_after_flush_agree(self, open_cache):
        cache = open_cache(flush_every=None)
        cache.add(make_row(0, tokens=512))
        before = cache.get(make_row(0)["key"])
        cache.flush()
        assert open_cache().get(make_row(0)["key"]) == before

    def test_miss_and_failures_are_not_hits(self, open_cache):
        cache = open_cache()
        failed = make_row(1, status="failed")
        assert cache.get("nope") is None and "nope" not in cache
        assert cache.add(failed)
        assert failed["key"] not in cache and cache.get(failed["key"]) is None and len(cache) == 0
        assert cache.get_failed(failed["key"])["error"] == "RayActorError: actor died"
        assert open_cache().get_failed(failed["key"]) is not None
        assert open_cache().rows(include_failed=True)[0]["status"] == "failed"

    def test_ok_beats_failed_and_first_ok_wins(self, open_cache):
        cache = open_cache()
        key = make_row(2)["key"]
        cache.add(make_row(2, status="failed"))
        assert cache.add(make_row(2, ppl=12.0))
        assert not cache.add(make_row(2, ppl=99.0))  # key already present: ignored
        assert not cache.add(make_row(2, status="failed"))
        for view in (cache, open_cache()):
            assert view.get(key)["ppl"] == 12.0 and view.get_failed(key) is None and len(view) == 1

    def test_dedupe_by_key_across_parts(self, open_cache):
        first, second = open_cache(), open_cache()  # neither knows the other's row when adding
        first.add(make_row(3, ppl=11.0))
        second.add(make_row(3, ppl=13.0))
        second.add(make_row(4, ppl=14.0))
        merged = open_cache()
        assert len(merged) == 2 and len(merged.rows()) == 2
        assert merged.get(make_row(3)["key"])["ppl"] == 11.0  # the first ok row wins

    def test_nan_and_inf_ppl_are_data(self, open_cache):
        cache = open_cache()
        cache.add(make_row(0, ppl=float("nan")))
        cache.add(make_row(1, ppl=float("inf")))
        reopened = open_cache()
        assert math.isnan(reopened.get(make_row(0)["key"])["ppl"])
        assert math.isnan(reopened.get(make_row(0)["key"])["nll_sum"])
        assert reopened.get(make_row(1)["key"])["ppl"] == float("inf")

    def test_reopen_after_flush_sees_everything(self, open_cache):
        cache = open_cache(flush_every=3)
        for layer in range(7):
            cache.add(make_row(layer))
        assert cache.stats()["buffered"] == 1  # auto-flushed twice
        assert len(open_cache()) == 6
        cache.flush()
        assert len(open_cache()) == 7

    def test_default_flushes_every_row(self, open_cache):
        cache = open_cache()
        cache.add(make_row(0))
        assert cache.stats()["buffered"] == 0 and len(open_cache()) == 1  # no flush call needed

    def test_refresh_sees_another_instances_parts(self, open_cache):
        reader, writer = open_cache(), open_cache()
        writer.add(make_row(5))
        assert make_row(5)["key"] not in reader
        assert reader.refresh() == 1 and make_row(5)["key"] in reader
        assert reader.refresh() == 0

    def test_context_manager_flushes_on_error(self, open_cache):
        with pytest.raises(RuntimeError):
            with open_cache(flush_every=None) as cache:
                cache.add(make_row(0))
                raise RuntimeError("search crashed")
        assert len(open_cache()) == 1

    @pytest.mark.parametrize("change, field", [
        ({"bogus": 1}, "bogus"), ({"tokens": 2.5}, "tokens"), ({"ppl": "high"}, "ppl"),
        ({"status": "maybe"}, "status"), ({"key": None}, "key"), ({"nll_sum": None}, "nll_sum"),
        ({"tokens": True}, "tokens"),
    ])
    def test_bad_rows_are_rejected_naming_the_field(self, open_cache, change, field):
        cache = open_cache()
        with pytest.raises(ValueError, match=field):
            cache.add(make_row(0) | change)
        assert len(cache) == 0 and cache.stats()["buffered"] == 0


class TestParquetParts:
    """How EvalCache keeps the contract on disk."""

    def parts(self, directory: Path) -> list[Path]:
        return sorted(directory.glob("*.parquet"))

    def test_one_part_per_flush_and_none_when_empty(self, tmp_path):
        cache = EvalCache(tmp_path, flush_every=None)
        assert cache.flush() is None and self.parts(tmp_path) == []
        cache.add(make_row(0))
        cache.add(make_row(1))
        path = cache.flush()
        assert self.parts(tmp_path) == [path] and path.name.startswith("part-")
        assert pq.read_table(path).num_rows == 2

    def test_compact_merges_parts_without_losing_a_row(self, tmp_path):
        cache = EvalCache(tmp_path)  # one part per row
        for layer in range(5):
            cache.add(make_row(layer, ppl=10.0 + layer))
        cache.add(make_row(7, status="failed"))
        assert len(self.parts(tmp_path)) == 6
        merged = cache.compact()
        assert self.parts(tmp_path) == [merged]
        again = EvalCache(tmp_path)
        assert {r["key"]: r["ppl"] for r in again.rows()} == {r["key"]: r["ppl"] for r in cache.rows()}
        assert len(again) == 5 and again.get_failed(make_row(7)["key"]) is not None
        assert again.compact() is None  # one part already

    def test_dot_files_are_ignored(self, tmp_path):
        """A writer that crashed before its rename leaves only a dot-file, which readers skip."""
        EvalCache(tmp_path).add(make_row(0))
        good = self.parts(tmp_path)[0]
        (tmp_path / f".{good.name}.tmp").write_bytes(good.read_bytes()[:50])  # torn, unrenamed
        (tmp_path / ".part-1-abcdef12.parquet").write_bytes(b"garbage")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither is read, so neither is quarantined
            assert len(EvalCache(tmp_path)) == 1
        assert not (tmp_path / "quarantine").exists()

    def test_parts_appear_only_by_rename(self, tmp_path, monkeypatch):
        """Every file written goes through a dot-name; the visible name appears by os.replace."""
        written: list[str] = []
        real_write = pq.write_table
        monkeypatch.setattr(pq, "write_table", lambda table, where, **kw: (
            written.append(Path(where.name).name), real_write(table, where, **kw))[1])
        EvalCache(tmp_path).add(make_row(0))
        assert written and all(name.startswith(".") for name in written)
        assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [self.parts(tmp_path)[0].name]

    def test_failed_write_leaves_nothing_and_keeps_rows(self, tmp_path, monkeypatch):
        cache = EvalCache(tmp_path, flush_every=None)
        cache.add(make_row(0))

        def disk_full(table, where, **kwargs):
            where.write(b"PAR1 half a part")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(pq, "write_table", disk_full)
        with pytest.raises(OSError):
            cache.flush()
        assert list(tmp_path.iterdir()) == [] and cache.stats()["buffered"] == 1
        monkeypatch.undo()
        cache.flush()
        assert len(EvalCache(tmp_path)) == 1

    def test_truncated_part_is_quarantined_and_others_survive(self, tmp_path):
        cache = EvalCache(tmp_path)
        for layer in range(3):
            cache.add(make_row(layer))
        torn = self.parts(tmp_path)[1]
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
        (tmp_path / "part-0-deadbeef.parquet").write_bytes(b"not parquet at all")
        with pytest.warns(CorruptPartWarning) as caught:
            reopened = EvalCache(tmp_path)
        assert {str(w.message).split(" is unreadable")[0] for w in caught} == {
            f"cache part {torn}", f"cache part {tmp_path / 'part-0-deadbeef.parquet'}"}
        assert len(reopened) == 2 and make_row(1)["key"] not in reopened
        assert sorted(p.name for p in (tmp_path / "quarantine").iterdir()) == sorted(
            [torn.name, "part-0-deadbeef.parquet"])
        assert reopened.stats()["quarantined"] == 2 and len(self.parts(tmp_path)) == 2
        reopened.add(make_row(1))  # the lost row is simply evaluated again
        assert len(EvalCache(tmp_path)) == 3

    def test_part_with_wrong_columns_is_quarantined(self, tmp_path):
        pq.write_table(pa.table({"key": ["k"]}), tmp_path / "part-1-00000000.parquet")
        with pytest.warns(CorruptPartWarning, match="columns"):
            assert len(EvalCache(tmp_path)) == 0

    def test_no_pickle_anywhere(self, tmp_path):
        for module in (cache_module, cache_parts_module):
            tree = ast.parse(inspect.getsource(module))
            imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                        if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
            imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            assert not imported & {"pickle", "cloudpickle", "dill", "joblib", "shelve"}, module.__name__
        EvalCache(tmp_path).add(make_row(0, ppl=float("nan")))
        part = self.parts(tmp_path)[0]
        schema = pq.read_schema(part)
        assert schema.equals(SCHEMA, check_metadata=False)
        assert not any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in schema)
        assert set(schema.metadata) == {b"rayprune.cache.schema_version"}  # no pandas/pickled extras
        assert b"pickle" not in part.read_bytes()
