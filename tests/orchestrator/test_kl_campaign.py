"""A campaign with KL fitness on real Ray actors: ranked by KL to the dense model, reported as such,
held-out perplexity as always, and its cache rows never standing for perplexity rows."""

from __future__ import annotations

import json

import pytest

from orchestrator.cache import EvalCache
from orchestrator.campaign import Campaign
from tests.tiny import tiny_campaign_config, tiny_run_setup

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("kl"))


def test_kl_fitness_campaign(ray_session, setup):
    settings = {"search.target_ratio": 0.3, "search.fitness": "kl", "search.kl_top_k": 16, "export": "false"}
    result = Campaign(tiny_campaign_config(setup, "kl", **settings), progress=False).run()
    path = json.loads((result.run_dir / "path.json").read_text())
    assert path["fitness"] == "kl:16"
    assert path["dense_ppl"] == pytest.approx(1.0, abs=1e-6)  # exp(KL of the dense model to itself)
    assert all(s["ppl"] > 1.0 for s in path["steps"]) and path["heldout"]["pruned_ppl"] > path["heldout"]["dense_ppl"]
    assert "exp(KL) to dense (calibration, kl:16)" in (result.run_dir / "report.md").read_text()
    rows = EvalCache(result.run_dir / "evals", flush_every=None).rows()
    fitness_fps = {r["model_fp"].rsplit("+", 1)[-1] for r in rows if r["model_fp"].endswith("kl:16")}
    assert fitness_fps == {"kl:16"}
    # The same run directory with perplexity fitness reuses none of the KL rows.
    again = Campaign(tiny_campaign_config(setup, "kl", **{**settings, "search.fitness": "ppl"}), progress=False).run()
    assert again.counters.evaluated > 0
    assert json.loads((again.run_dir / "path.json").read_text())["dense_ppl"] > 2
