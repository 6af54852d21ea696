"""SPRINT end to end in-process (no Ray): the path, targets, replay from the run directory, exports.

The evaluator is the real ``Evaluator`` class called directly; only the latency table is fixed
(a tiny model's block timings are noise), so the path is deterministic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from actors.evaluator import Evaluator
from actors.export import load_pruned
from actors.forward import LeanDecoder
from actors.sprint import TunedSwap
from tests.tiny import reorder_by_l1_
from orchestrator.cache import EvalCache
from orchestrator.campaign import Campaign, CampaignResult
from orchestrator.data.windows import windows_fingerprint
from orchestrator.eval_model import load_target
from orchestrator.export import export_run
from orchestrator.rundir import StepStore
from orchestrator.scorer import Scorer
from orchestrator.search_run import drive
from orchestrator.sprint_run import SprintRun
from search_spaces import Mask
from search_spaces.latency import BlockCosts, LatencyTable
from tests.tiny import tiny_arch, tiny_campaign_config, tiny_model, tiny_run_setup

TABLE = LatencyTable("test-device", "fp", {"prefill:512": BlockCosts(0.2, 0.1, 0.25)}, {"prefill:512": 1.6})


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("sprint"))


def make_campaign(setup, name: str, **overrides) -> Campaign:
    config = tiny_campaign_config(setup, name, **{
        "data.calibration": "{sequences: 6, length: 24, seed: 0}", "search.method": "sprint", "search.batch_size": 4,
        "search.sprint.top_k": 3, "search.sprint.checkpoint_every": 1,
        # The scenario of the fixed table (the default, SPRINT's 1,024 + 512 tokens, is slow to time here).
        "search.sprint.latency_prompt": 512, "search.sprint.latency_generate": 0, **overrides})
    campaign = Campaign(config, progress=False)
    campaign.arch, campaign.windows = campaign.prepare()
    assert campaign.arch == tiny_arch("llama")
    return campaign


class InProcess:
    """The dispatcher's ``call`` on the real Evaluator class, in this process; the latency table fixed."""

    def __init__(self, evaluator: Evaluator, calls: list | None) -> None:
        self.actors, self.evaluator, self.calls = [evaluator], evaluator, calls

    def call(self, method, *args, timeout_s=None):
        if self.calls is not None:
            self.calls.append(method)
        return TABLE.to_dict() if method == "latency_table" else getattr(self.evaluator, method)(*args)


def in_process(campaign: Campaign, evaluator: Evaluator | None = None, calls: list | None = None):
    evaluator = evaluator or Evaluator(campaign.config.model, campaign.windows, batch_size=4)
    fingerprints = {k: windows_fingerprint(w) for k, w in campaign.windows.items()}
    campaign.scorer = Scorer(EvalCache(campaign.rundir.evals, flush_every=None), InProcess(evaluator, calls),
                             campaign.arch, evaluator.model_fingerprint, fingerprints)
    run = SprintRun(campaign.config, campaign.scorer, campaign.rundir)
    searcher = drive(run)
    heldout = run.heldout(searcher)
    result = CampaignResult(campaign.run_dir, searcher, heldout, campaign.scorer.counters, 1.0, run.extras(searcher))
    campaign.write_outputs(result, campaign.arch)
    return result, evaluator


def tuned_decoder(run_dir, step: dict):
    """The tuned masked model of a path step, built independently: reordered replica + refitted weights."""
    arch = tiny_arch("llama")
    decoder = LeanDecoder(reorder_by_l1_(tiny_model("llama"), arch), arch)
    store = StepStore(run_dir)
    weights = {int(l): torch.as_tensor(store.load_weight(sha)) for l, sha in step["tuned_weights"].items()}
    return decoder, Mask.from_dict(step["mask"]), weights


def test_sprint_path_targets_replay_and_export(tiny_setup):
    campaign = make_campaign(tiny_setup, "speed", **{"search.target_speedup": 1.35})
    result, evaluator = in_process(campaign)
    searcher, run_dir = result.searcher, result.run_dir
    path = json.loads((run_dir / "path.json").read_text())

    # Stops at the first step whose estimated speedup reaches the target.
    speedups = [s["speedup"] for s in path["steps"]]
    assert speedups[-1] >= 1.35 and all(s < 1.35 for s in speedups[:-1]) and speedups == sorted(speedups)
    assert all(s["kind"] in ("attn", "mlp") for s in path["steps"])
    assert {"ppl", "ratio", "speedup", "tuned_weights", "refit"} <= set(path["steps"][0])
    assert path["target_speedup"] == 1.35 and path["sprint"]["speedup"] == pytest.approx(speedups[-1])
    assert path["sprint"]["latency"]["device"] == "test-device"
    assert any(s["tuned_weights"] for s in path["steps"]), "no refit was kept on this path"

    # Every perplexity on the path is that of the tuned masked model, computed independently.
    windows = torch.as_tensor(campaign.windows["calibration"])
    for s in path["steps"]:
        decoder, mask, weights = tuned_decoder(run_dir, s)
        with torch.inference_mode(), TunedSwap(decoder, weights):
            nll, tokens = decoder.nll(decoder.run(decoder.embed(windows), mask), windows)
        assert s["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert all(math.isfinite(v) for v in path["heldout"].values())

    # The compact export (and that of any prefix) carries the refitted weights.
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(9))
    tuned_steps = [k for k, s in enumerate(path["steps"], 1) if s["tuned_weights"]]
    for k, out in [(len(path["steps"]), run_dir / "model"),
                   (tuned_steps[0], export_run(run_dir, step=tuned_steps[0], out=run_dir / "prefix"))]:
        decoder, mask, weights = tuned_decoder(run_dir, path["steps"][k - 1])
        with torch.inference_mode():
            with TunedSwap(decoder, weights):
                expected = decoder.forward_logits(ids, mask)
            got = load_pruned(out)(ids).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert json.loads((out / "config.json").read_text())["rayprune"]["tuned"] == path["steps"][k - 1]["tuned_weights"]

    # `rayprune eval RUN` on the run without model/ rebuilds the same tuned model in memory.
    assert path["steps"][-1]["tuned_weights"], "the final model carries no refit: nothing to restore"
    (run_dir / "model").rename(run_dir / "model.moved")
    try:
        target = load_target(str(run_dir))
    finally:
        (run_dir / "model.moved").rename(run_dir / "model")
    assert target.kind == "run (masked in memory)"
    decoder, mask, weights = tuned_decoder(run_dir, path["steps"][-1])
    with torch.inference_mode():
        with TunedSwap(decoder, weights):
            expected = decoder.forward_logits(ids, mask)
        torch.testing.assert_close(target.model(ids).logits, expected, atol=1e-5, rtol=0)

    # A rerun replays every step from the run directory: no step runs again.
    calls: list[str] = []
    again, _ = in_process(make_campaign(tiny_setup, "speed", **{"search.target_speedup": 1.35}), evaluator, calls)
    assert calls == ["latency_table"]
    assert [(s.kind, s.layer, s.ppl) for s in again.searcher.path] == [(s.kind, s.layer, s.ppl) for s in searcher.path]
    assert again.heldout == result.heldout


def test_ratio_target_and_a_longer_run_reuses_the_shorter_one(tiny_setup):
    short, evaluator = in_process(make_campaign(tiny_setup, "ratio", **{"search.target_ratio": 0.15}))
    assert short.searcher.path[-1].ratio >= 0.15 > (short.searcher.path[-2].ratio if len(short.searcher.path) > 1 else 0)
    calls: list[str] = []
    campaign = make_campaign(tiny_setup, "ratio", **{"search.target_ratio": 0.3})
    longer, _ = in_process(campaign, evaluator, calls)
    n = len(short.searcher.path)
    assert [(s.kind, s.layer) for s in longer.searcher.path[:n]] == [(s.kind, s.layer) for s in short.searcher.path]
    assert calls.count("sprint_step") == len(longer.searcher.path) - n + 2  # new steps, final ppl, held-out
    assert campaign.scorer.counters.cached >= n
