"""End-to-end campaigns on a tiny model with real Ray actors (shared session)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from orchestrator.campaign import Campaign
from orchestrator.data.windows import read_windows
from orchestrator.search import BlockPrunerSearcher
from tests.tiny import tiny_arch, tiny_campaign_config, tiny_model, tiny_run_setup

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("campaign"))


def make_config(setup, name: str, **overrides):
    return tiny_campaign_config(setup, name, **{"search.target_ratio": 0.5, "search.max_steps": 3, **overrides})


def test_campaign_matches_in_process_greedy_and_resumes(ray_session, tiny_setup):
    config = make_config(tiny_setup, "resume")
    first = Campaign(config, progress=False).run()
    run_dir = first.run_dir

    # The run directory works for someone else.
    path = json.loads((run_dir / "path.json").read_text())
    assert set(path) >= {"dense_ppl", "dense_params", "steps"}
    assert [set(s) >= {"step", "kind", "layer", "ppl", "ratio"} for s in path["steps"]] == [True] * 3
    assert all(s["kind"] in ("attn", "mlp") for s in path["steps"])
    for name in ("config.yaml", "calibration.parquet", "report.md", "curve.png", "pruning_config.json"):
        assert (run_dir / name).exists(), name
    from actors.export import load_pruned
    from actors.surgery import count_parameters

    assert count_parameters(load_pruned(run_dir / "model")) == path["steps"][-1]["params"]
    assert list((run_dir / "evals").glob("*.parquet"))

    # calibration.parquet holds exactly the windows that were evaluated: replaying the search
    # in-process on them gives the same path and the same perplexities.
    windows = torch.as_tensor(read_windows(run_dir / "calibration.parquet"))
    assert tuple(windows.shape) == (4, 24)
    arch = tiny_arch("llama")
    engine = Engine(LeanDecoder(tiny_model("llama"), arch), batch_size=2)
    searcher = BlockPrunerSearcher(arch, 0.5, max_steps=3)
    while (p := searcher.suggest()) is not None:
        scores = engine.score_masks(windows, p.masks, base=p.base)
        searcher.observe({m: math.exp(s.nll_sum / s.tokens) for m, s in zip(p.masks, scores)})
    assert [(s["kind"], s["layer"]) for s in path["steps"]] == [(s.kind, s.layer) for s in searcher.path]
    assert [s["ppl"] for s in path["steps"]] == pytest.approx([s.ppl for s in searcher.path], rel=1e-6)
    assert first.counters.evaluated == 1 + 8 + 7 + 6 + 2  # dense+cands per step, then 2 held-out
    assert first.counters.cached == 0

    # Rerun with one more step: only the new step's candidates and the new final mask are evaluated.
    second = Campaign(make_config(tiny_setup, "resume", **{"search.max_steps": 4}), progress=False).run()
    assert second.counters.evaluated == 5 + 1  # step 4's candidates + held-out of the new final mask
    assert second.counters.cached == 1 + 8 + 7 + 6 + 1  # steps 1-3 and held-out dense
    # Token accounting: a row's tokens count once, as computed (first run) or served (second run).
    calibration_row = 4 * 23  # 4 windows of 24 tokens, 23 predicted each
    heldout_row, rest = divmod(first.counters.tokens_evaluated - 22 * calibration_row, 2)  # dense and final
    assert heldout_row > 0 and rest == 0 and first.counters.tokens_cached == 0
    assert second.counters.tokens_cached == 22 * calibration_row + heldout_row
    assert second.counters.tokens_evaluated == 5 * calibration_row + heldout_row
    assert second.counters.tokens_by_set == {"calibration": 27 * calibration_row, "evaluation": 2 * heldout_row}
    assert [(s.kind, s.layer) for s in second.searcher.path[:3]] == [(s.kind, s.layer) for s in first.searcher.path]


def test_second_driver_on_same_run_directory_is_refused(tiny_setup):
    from orchestrator.campaign import RunDirectoryBusy

    config = make_config(tiny_setup, "locked")
    holder = Campaign(config)
    holder.lock()
    with pytest.raises(RunDirectoryBusy, match="in use by another rayprune driver"):
        Campaign(config).lock()
    holder.unlock()  # what run() does when it returns or fails
    second = Campaign(config)
    second.lock()
    second.unlock()
