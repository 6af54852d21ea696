"""An evolution campaign on a tiny model with real Ray actors: outputs, the greedy reference, replay."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cache import EvalCache
from orchestrator.campaign import Campaign
from search_spaces import Mask, param_count
from tests.orchestrator.test_faults import _reap_session
from tests.orchestrator.test_optuna_campaign import counting, evaluated, masks_of
from tests.tiny import tiny_arch, tiny_campaign_config, tiny_overrides, tiny_run_setup

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("evolution"))


def test_evolution_campaign_writes_its_search_and_replays_from_the_cache(ray_session, setup, tmp_path):
    config = tiny_campaign_config(setup, "evolution", **{
        "search.method": "evolution", "search.target_ratio": 0.3, "search.evolution.offspring": 4,
        "search.evolution.generations": 3, "search.evolution.first_windows": "null", "search.seed": 2})
    result = Campaign(config, progress=False, evaluator_cls=counting(tmp_path)).run()
    lines = evaluated(tmp_path)
    assert len(lines) == len(set(lines)) and len(masks_of(lines)) == result.counters.evaluated
    run_dir, arch = result.run_dir, tiny_arch("llama")
    search = json.loads((run_dir / "search.json").read_text())
    assert search["method"] == "evolution" and search["generations"] == 3 and search["evaluations"] <= 12
    assert search["best_ppl"] <= search["greedy_ppl"]
    best, greedy = Mask.from_dict(search["best_mask"]), Mask.from_dict(search["greedy_mask"])
    assert result.searcher.current == best and param_count(best, arch) == param_count(greedy, arch)
    path = json.loads((run_dir / "path.json").read_text())
    assert Mask.from_dict(path["steps"][-1]["mask"]) == best
    assert ("greedy_ppl" in path["heldout"]) == (best != greedy)
    assert "## Evolutionary search" in (run_dir / "report.md").read_text()
    assert (run_dir / "model" / "config.json").exists()

    again = Campaign(config, progress=False, evaluator_cls=counting(tmp_path)).run()
    assert again.counters.evaluated == 0 and evaluated(tmp_path) == lines
    assert again.searcher.current == best and again.searcher.history == result.searcher.history


def test_two_step_selection_scores_offspring_on_a_prefix_and_forwards_no_window_twice(ray_session, setup, tmp_path):
    config = tiny_campaign_config(setup, "evolution-two-step", **{
        "search.method": "evolution", "search.target_ratio": 0.3, "search.evolution.offspring": 4,
        "search.evolution.generations": 2, "search.evolution.first_windows": 4, "search.evolution.survivors": 1,
        "data.calibration": "{sequences: 8, length: 24, seed: 0}", "export": "false"})
    result = Campaign(config, progress=False, evaluator_cls=counting(tmp_path)).run()
    lines = evaluated(tmp_path)
    assert len(lines) == len(set(lines))  # no (mask, windows) forwarded twice
    run_dir = result.run_dir
    search = json.loads((run_dir / "search.json").read_text())
    assert search["first_windows"] == 4 and search["survivors"] == 1
    # Tokens: every offspring on windows [0, 4), the one survivor of each generation on [4, 8); 23 per window.
    assert search["tokens"] == (search["evaluations"] * 4 + search["generations"] * 4) * 23
    # The cache holds each offspring on windows [0, 4) and each survivor on [4, 8) too, under their own keys.
    by_fp: dict[str, set[Mask]] = {}
    for row in EvalCache(run_dir / "evals", flush_every=None).rows():
        by_fp.setdefault(row["calibration_fp"], set()).add(Mask.from_json(row["mask_json"]))
    single = Mask(attn_removed={0})  # scored by the greedy phase on the whole calibration set only
    calibration = next(fp for fp, masks in by_fp.items() if single in masks)
    prefix, rest = (by_fp[hashlib.sha256(f"{calibration}[{a}:{b}]".encode()).hexdigest()[:32]]
                    for a, b in ((0, 4), (4, 8)))
    assert 4 <= len(prefix) <= search["evaluations"] == 8  # 2 generations x 4 offspring (a repeat is not rescored)
    assert rest <= prefix and 1 <= len(rest) <= 2  # one survivor per generation goes on to every window
    assert Mask.from_dict(search["best_mask"]) == result.searcher.current and (run_dir / "report.md").exists()


def test_evolution_with_widths_scores_narrowed_layers_on_the_actors_and_exports_them(ray_session, setup, tmp_path):
    config = tiny_campaign_config(setup, "evolution-widths", **{
        "search.method": "evolution", "search.target_ratio": 0.3, "search.widths": "true", "search.mlp_group": 16,
        "search.evolution.offspring": 4, "search.evolution.generations": 3, "search.seed": 1})
    result = Campaign(config, progress=False, evaluator_cls=counting(tmp_path)).run()
    forwarded = [Mask.from_json(line.split(" ", 1)[1]) for line in masks_of(evaluated(tmp_path))]
    narrowed = [m for m in forwarded if m.mlp_width or m.head_units]
    assert narrowed  # offspring that narrow layers were forwarded by the evaluators
    search = json.loads((result.run_dir / "search.json").read_text())
    assert search["widths"] is True and search["best_ppl"] <= search["greedy_ppl"]
    arch, best = tiny_arch("llama"), Mask.from_dict(search["best_mask"])
    assert param_count(best, arch) <= param_count(Mask.from_dict(search["greedy_mask"]), arch) + 3 * arch.hidden_size
    assert "moves of one width level between two layers" in (result.run_dir / "report.md").read_text()
    exported = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert exported["num_hidden_layers"] == arch.num_layers  # layers narrowed or emptied, exported compact


@pytest.mark.slow
def test_a_campaign_killed_mid_generation_resumes_to_the_same_result(ray_session, setup, tmp_path):
    """A real ``rayprune run`` driver dies (``os._exit``, as SIGKILL) in generation 2, after its
    offspring were scored on the first windows and cached; the rerun ends where an uninterrupted
    campaign ends and forwards nothing the killed one had computed."""
    settings = {"search.method": "evolution", "search.target_ratio": 0.3, "search.evolution.offspring": 4,
                "search.evolution.generations": 3, "search.evolution.first_windows": 4,
                "search.evolution.survivors": 1, "search.seed": 5,
                "data.calibration": "{sequences: 8, length: 24, seed: 0}", "export": "false"}
    reference = Campaign(tiny_campaign_config(setup, "evolution-reference", **settings), progress=False).run()

    name = "evolution-killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"# rayprune run {config.name} (killed by test_evolution_campaign.py)\nname: {name}\n")
    proc = subprocess.Popen([sys.executable, "-m", "tests.killpoints", "generation", "run", "--no-progress",
                             str(config), *tiny_overrides(setup, name, **settings)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _reap_session(proc.pid)  # the killed driver's private Ray session
    assert proc.returncode == 137, out[-3000:]
    run_dir = setup["root"] / name
    assert not (run_dir / "path.json").exists() and not (run_dir / "search.json").exists()
    cached = {r["key"] for r in EvalCache(run_dir / "evals", flush_every=None).rows() if r["status"] == "ok"}
    assert cached

    resumed = Campaign(tiny_campaign_config(setup, name, **settings), progress=False).run()
    assert resumed.counters.evaluated > 0  # generation 2 goes on
    assert resumed.counters.evaluated + len(cached) == reference.counters.evaluated  # nothing forwarded twice
    assert resumed.searcher.current == reference.searcher.current
    assert resumed.searcher.history == reference.searcher.history
    ours, theirs = (json.loads((r.run_dir / "search.json").read_text()) for r in (resumed, reference))
    assert ours == theirs
    steps = [[(s["kind"], s["layer"], s["ppl"]) for s in json.loads((r.run_dir / "path.json").read_text())["steps"]]
             for r in (resumed, reference)]
    assert steps[0] == steps[1]
