"""A SPRINT campaign on real Ray actors: one evaluator killed mid-step changes nothing."""

from __future__ import annotations

import json

import pytest

from orchestrator.campaign import Campaign
from tests.orchestrator.sprint_evaluators import KilledInStep
from tests.orchestrator.test_sprint import in_process, make_campaign
from tests.tiny import tiny_run_setup

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("sprint-ray"))


def test_campaign_survives_a_killed_evaluator_and_matches_in_process(ray_session, tiny_setup, tmp_path):
    settings = {"search.target_ratio": 0.3}
    reference, _ = in_process(make_campaign(tiny_setup, "reference", **settings))
    killer = type("ConfiguredKilledInStep", (KilledInStep,), {"marker_dir": str(tmp_path), "after": 1})
    config = make_campaign(tiny_setup, "ray", **settings, **{"cluster.actors": 2}).config
    result = Campaign(config, progress=False, evaluator_cls=killer).run()
    assert (tmp_path / "killed").exists()  # the fault happened
    path = json.loads((result.run_dir / "path.json").read_text())
    assert [(s["kind"], s["layer"]) for s in path["steps"]] == [(s.kind, s.layer) for s in reference.searcher.path]
    assert [s["ppl"] for s in path["steps"]] == pytest.approx([s.ppl for s in reference.searcher.path], rel=1e-4)
    assert path["heldout"]["pruned_ppl"] == pytest.approx(reference.heldout["pruned_ppl"], rel=1e-4)
    assert (result.run_dir / "model" / "config.json").exists() and path["sprint"]["speedup"] > 1
