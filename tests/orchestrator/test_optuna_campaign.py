"""Optuna campaigns on a tiny model with real Ray actors: no mask evaluated twice, resume, outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pytest

from actors.evaluator import Evaluator
from orchestrator.campaign import Campaign
from orchestrator.search.optuna_search import OptunaSearcher
from search_spaces import Mask
from tests.tiny import tiny_campaign_config, tiny_run_setup

pytestmark = pytest.mark.ray


class CountingEvaluator(Evaluator):
    """Appends one line per mask and window shard it scores to ``<log_dir>/evaluated.log`` (across
    actors and runs): ``<window set> <rows or all> <mask>``."""

    log_dir: str = ""

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        shard = "all" if rows is None else f"{rows[0]}-{rows[1]}"
        with open(os.path.join(self.log_dir, "evaluated.log"), "a") as handle:
            handle.writelines(f"{window_set} {shard} {m}\n" for m in masks)
        return super().evaluate(window_set, masks, base, rows)


def counting(log_dir: Path) -> type:
    return type("ConfiguredCountingEvaluator", (CountingEvaluator,), {"log_dir": str(log_dir)})


def run(cfg, log_dir: Path):
    return Campaign(cfg, progress=False, evaluator_cls=counting(log_dir)).run()


def evaluated(log_dir: Path) -> list[str]:
    """Every (window set, shard, mask) an evaluator scored, in order."""
    file = log_dir / "evaluated.log"
    return file.read_text().splitlines() if file.exists() else []


def masks_of(lines: list[str]) -> set[str]:
    """The (window set, mask) pairs of ``evaluated`` lines: a mask's shards count once."""
    return {f"{line.split(' ', 2)[0]} {line.split(' ', 2)[2]}" for line in lines}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("optuna"))


def config(setup, name: str, **overrides):
    return tiny_campaign_config(setup, name, **{
        "search.method": "optuna", "search.target_ratio": 0.3, "search.trials": 10, "search.batch": 4,
        "export": "false", **overrides})


def test_optuna_campaign_evaluates_no_mask_twice_and_writes_its_study(ray_session, setup, tmp_path):
    result = run(config(setup, "study"), tmp_path)
    lines = evaluated(tmp_path)
    assert len(lines) == len(set(lines))  # no mask scored twice on the same windows
    assert len(masks_of(lines)) == result.counters.evaluated  # every evaluator call was a new mask
    run_dir = result.run_dir
    search = json.loads((run_dir / "search.json").read_text())
    low, high = search["band"]
    assert search["counts"]["sampler"] == 10 and search["counts"]["blockpruner"] == 1
    assert all(low - 1e-12 <= p["ratio"] <= high + 1e-12 for p in search["points"])
    assert search["best"]["ppl"] <= search["blockpruner"]["ppl"]
    assert result.searcher.current == Mask.from_dict(search["best"]["mask"])
    for name in ("optuna.journal", "pareto.png", "report.md", "path.json"):
        assert (run_dir / name).exists(), name
    path = json.loads((run_dir / "path.json").read_text())
    assert set(path["heldout"]) == {"dense_ppl", "pruned_ppl", "blockpruner_ppl"}
    report = (run_dir / "report.md").read_text()
    assert "## Optuna study" in report and ("improved on BlockPruner" in report or "did not improve" in report)

    # The same campaign again: everything from the cache, the study already complete.
    again = run(config(setup, "study"), tmp_path)
    assert again.counters.evaluated == 0 and evaluated(tmp_path) == lines
    assert again.searcher.current == result.searcher.current


class Stop(Exception):
    """Stands for the driver being stopped mid-study (Ctrl-C, a lost node)."""


def test_optuna_campaign_resumes_after_being_stopped(ray_session, setup, tmp_path, monkeypatch):
    settings = {"search.warm_start": "none", "search.trials": 16}
    observe, batches = OptunaSearcher.observe, []

    def stop_on_third_batch(self, scores):
        batches.append(len(scores))
        if len(batches) == 3:
            raise Stop  # the batch was evaluated (and cached) but never told to the study
        observe(self, scores)

    monkeypatch.setattr(OptunaSearcher, "observe", stop_on_third_batch)
    with pytest.raises(Stop):
        run(config(setup, "resume", **settings), tmp_path)
    monkeypatch.setattr(OptunaSearcher, "observe", observe)
    stopped = evaluated(tmp_path)
    assert len(masks_of(stopped)) == sum(batches)

    result = run(config(setup, "resume", **settings), tmp_path)
    lines = evaluated(tmp_path)
    # The stopped batch's trials were told from the cache rows (not evaluated again), then the study went on.
    assert len(lines) == len(set(lines))
    assert result.counters.evaluated == len(masks_of(lines)) - len(masks_of(stopped)) > 0
    search = json.loads((result.run_dir / "search.json").read_text())
    assert search["counts"]["sampler"] == 16 and "blockpruner" not in search["counts"]
    assert {p["state"] for p in search["points"]} <= {"COMPLETE", "FAIL"}
