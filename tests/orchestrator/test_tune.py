"""``rayprune tune`` on a tiny model: trials on one evaluator pool and one cache; best.yaml replays."""

from __future__ import annotations

import csv
import json

import pytest

from orchestrator.cache import EvalCache
from orchestrator.campaign import Campaign
from orchestrator.cli import main
from orchestrator.config_load import load_config
from orchestrator.tune import ORDERS, split_of
from tests.tiny import save_tiny, write_corpus

pytestmark = pytest.mark.ray


def test_split_of_covers_the_simplex():
    assert split_of(1.0, 0.3) == (1.0, 0.0, 0.0)  # BlockPruner
    assert split_of(0.4, 0.0) == (0.4, 0.6, 0.0)
    a, b, c = split_of(0.3, 0.2)
    assert (a, c) == (0.3, 0.14) and a + b + c == pytest.approx(1.0)
    assert len(ORDERS) == 6


def test_rayprune_tune_runs_trials_on_one_pool_and_best_replays_from_the_cache(ray_session, tmp_path, capsys):
    model, corpus = save_tiny("llama", tmp_path / "model"), write_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "tuned"
    config = tmp_path / "tune.yaml"
    config.write_text(f"""# rayprune tune {config} --trials 4
name: tuned
model: {model}
data:
  corpus: {corpus}
  calibration: {{sequences: 4, length: 24, seed: 0}}
  evaluation: {{sequences: 3, length: 32, seed: 1}}
search: {{method: multipruner, target_ratio: 0.3, batch_size: 2}}
cluster: {{actors: 2}}
output: {run_dir}
export: false
""")
    assert main(["tune", str(config), "--trials", "4", "--seed", "1"]) == 0
    assert "rayprune tune: tuned" in capsys.readouterr().out

    with open(run_dir / "tune_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    assert [float(r["val_ppl"]) for r in rows] == sorted(float(r["val_ppl"]) for r in rows)  # best first
    assert all(float(r["ratio"]) >= 0.3 for r in rows)
    assert {r["calibration_sequences"] for r in rows} <= {"2", "4"} and {r["order"] for r in rows} <= set(ORDERS)
    best = json.loads((run_dir / "tune_best.json").read_text())
    assert best["trial"] == int(rows[0]["trial"])
    assert (run_dir / "tune_report.md").read_text().count("\n| ") >= 5

    # Every evaluation of every trial came from the two replicas started once: no reload per trial.
    cache = EvalCache(run_dir / "evals")
    workers = {w for row in cache.rows() for w in row["worker"].split(",")}  # a sharded mask names each replica
    assert len(workers) == 2
    assert sum(int(r["evaluated"]) for r in rows) + 2 == len(cache)  # + dense on validation and held-out

    # best.yaml is a complete campaign config on this run directory: it replays from the shared cache.
    replay = Campaign(load_config(run_dir / "best.yaml"), progress=False)
    result = replay.run()
    assert result.counters.evaluated == 0
    assert result.searcher.current.to_json() == best["mask"]
    assert result.heldout["pruned_ppl"] == pytest.approx(best["heldout_ppl"])
