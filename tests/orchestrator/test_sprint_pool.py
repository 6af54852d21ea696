"""A SPRINT step spread over a pool (orchestrator/sprint_pool.py) decides as a step on one replica.

Two real ``Evaluator`` replicas in this process stand behind a dispatcher that runs each task on the
replica it prefers; the same campaign on one replica is the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.evaluator import Evaluator
from orchestrator.cache import EvalCache
from orchestrator.campaign import CampaignResult
from orchestrator.data.windows import windows_fingerprint
from orchestrator.dispatch import Call, Outcome
from orchestrator.rundir import StepStore
from orchestrator.scorer import Scorer
from orchestrator.search_run import drive
from orchestrator.sprint_pool import PoolStep
from orchestrator.sprint_run import SprintRun
from search_spaces import Mask
from search_spaces.sprint import StepRequest, present_blocks
from tests.orchestrator.sprint_evaluators import TABLE
from tests.orchestrator.test_sprint import make_campaign
from tests.tiny import tiny_run_setup

SETTINGS = {"data.calibration": "{sequences: 8, length: 24, seed: 0}", "search.batch_size": 2,
            "search.target_ratio": 0.3}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("sprint-pool"))


class InProcessPool:
    """A dispatcher over evaluators in this process: a task runs on the replica it prefers (else the
    next in turn); ``log`` records (method, phase, replica) of every call."""

    max_attempts = 1

    def __init__(self, evaluators: list[Evaluator]) -> None:
        self.actors, self.log, self._turn = list(evaluators), [], 0

    def run(self, tasks):
        for task in tasks:
            index = task.prefer if task.prefer is not None else self._turn % len(self.actors)
            self._turn += 1
            self.log.append((task.method, task.args[0] if task.method == "sprint_shard" else None, index))
            yield Outcome(task, self._invoke(self.actors[index], task.method, task.args))

    def call(self, method, *args, timeout_s=None):
        self.log.append((method, None, 0))
        return self._invoke(self.actors[0], method, args)

    @staticmethod
    def _invoke(evaluator, method, args):
        return TABLE.to_dict() if method == "latency_table" else getattr(evaluator, method)(*args)


def run_campaign(campaign, pool) -> CampaignResult:
    fingerprints = {k: windows_fingerprint(w) for k, w in campaign.windows.items()}
    campaign.scorer = Scorer(EvalCache(campaign.rundir.evals, flush_every=None), pool, campaign.arch,
                             pool.actors[0].model_fingerprint, fingerprints, batch_size=2,
                             window_shapes={n: w.shape for n, w in campaign.windows.items()})
    run = SprintRun(campaign.config, campaign.scorer, campaign.rundir)
    searcher = drive(run)
    heldout = run.heldout(searcher)
    result = CampaignResult(campaign.run_dir, searcher, heldout, campaign.scorer.counters, 1.0, run.extras(searcher))
    campaign.write_outputs(result, campaign.arch)
    return result


@pytest.fixture(scope="module")
def replicas(tiny_setup):
    campaign = make_campaign(tiny_setup, "replicas", **SETTINGS)
    return [Evaluator(campaign.config.model, campaign.windows, batch_size=2) for _ in range(2)], campaign.windows


def test_a_step_sharded_over_two_replicas_equals_the_step_on_one(tiny_setup, replicas, tmp_path):
    evaluators, windows = replicas
    arch = evaluators[0].arch
    store = StepStore(tmp_path)
    n = {name: w.shape[0] for name, w in windows.items()}
    one = PoolStep(InProcessPool(evaluators[:1]), store, num_layers=arch.num_layers, n_windows=n, batch_size=2,
                   timeout_s=60)
    pool = InProcessPool(evaluators)
    two = PoolStep(pool, store, num_layers=arch.num_layers, n_windows=n, batch_size=2, timeout_s=60)
    assert two.shards("calibration") == [(0, 4), (4, 8)] and one.shards("calibration") == [(0, 8)]
    from search_spaces.latency import BlockCosts

    request = StepRequest("calibration", Mask(), candidates=tuple(present_blocks(Mask(), arch.num_layers)),
                          costs=BlockCosts(0.2, 0.1, 0.25), top_k=3, ridge=0.1, checkpoint_every=1)
    whole, sharded = one.run(request), two.run(request)
    assert sharded["shards"] == 2 and "shards" not in whole
    assert sharded["tokens"] == whole["tokens"]
    assert sharded["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-9)
    assert sharded["sensitivity"].keys() == whole["sensitivity"].keys()
    for s, value in whole["sensitivity"].items():
        assert sharded["sensitivity"][s] == pytest.approx(value, rel=1e-9), s
    assert sharded["top"] == whole["top"]
    for got, expected in zip(sharded["tuned"], whole["tuned"]):
        assert (got["block"], got["target"], got["status"]) == (expected["block"], expected["target"], expected["status"])
        assert got["sensitivity"] == pytest.approx(expected["sensitivity"], rel=1e-9)
    assert sharded["choice"]["block"] == whole["choice"]["block"]  # the decision
    assert whole["choice"]["weight"] is not None, "this step's choice needed no refit: nothing to compare"
    np.testing.assert_allclose(sharded["choice"]["weight"], whole["choice"]["weight"], rtol=0, atol=1e-5)
    # Every phase ran on both replicas, each shard on the replica that ran it before.
    phases = [(phase, replica) for method, phase, replica in pool.log if method == "sprint_shard"]
    assert phases == [(p, r) for p in ("scores", "moments", "rescore") for r in (0, 1)]
    solves = [replica for method, _, replica in pool.log if method == "sprint_solve"]
    assert sorted(set(solves)) == [0, 1] and len(solves) == len([t for t in whole["tuned"] if t["status"] != "no-mlp"])
    # Only the chosen refit stays in the step store; the others were needed within the step only.
    assert sorted(p.stem for p in (tmp_path / "sprint" / "weights").iterdir()) == [sharded["choice"]["sha"]]


def test_a_campaign_on_two_replicas_takes_the_path_of_one(tiny_setup, replicas):
    evaluators, _ = replicas
    reference = run_campaign(make_campaign(tiny_setup, "one", **SETTINGS), InProcessPool(evaluators[:1]))
    pool = InProcessPool(evaluators)
    sharded = run_campaign(make_campaign(tiny_setup, "two", **SETTINGS), pool)
    assert [(s.kind, s.layer) for s in sharded.searcher.path] == [(s.kind, s.layer) for s in reference.searcher.path]
    assert len(reference.searcher.path) >= 3
    assert [s.ppl for s in sharded.searcher.path] == pytest.approx([s.ppl for s in reference.searcher.path], rel=1e-9)
    assert sharded.heldout == pytest.approx(reference.heldout, rel=1e-9)
    paths = [json.loads((r.run_dir / "path.json").read_text())["steps"] for r in (reference, sharded)]
    stores = [StepStore(r.run_dir) for r in (reference, sharded)]
    refits = 0
    for a, b in zip(*paths):
        assert a["tuned_weights"].keys() == b["tuned_weights"].keys()
        for layer in a["tuned_weights"]:
            refits += 1
            np.testing.assert_allclose(stores[1].load_weight(b["tuned_weights"][layer]),
                                       stores[0].load_weight(a["tuned_weights"][layer]), rtol=0, atol=1e-5)
    assert refits, "no refit on the path: nothing compared"
    assert {r for m, _, r in pool.log if m == "sprint_shard"} == {0, 1}
    # The state's calibration perplexity of every step came from shards of both replicas.
    assert any(m == "sprint_shard" for m, _, _ in pool.log) and not any(m == "sprint_step" for m, _, _ in pool.log)


def test_weights_a_replica_cannot_read_are_sent_by_reference(tiny_setup, replicas, tmp_path, monkeypatch):
    """A replica that does not see the run directory answers ``need_weights``; the step is then sent
    those weights by reference and decides the same."""
    evaluators, windows = replicas
    arch = evaluators[0].arch
    store = StepStore(tmp_path)
    weight = (0.01 * np.arange(arch.hidden_size * arch.intermediate_size, dtype=np.float32)
              ).reshape(arch.hidden_size, arch.intermediate_size) % 0.07
    from search_spaces.sprint import tensor_key

    sha = tensor_key(weight.shape, "float32", weight.tobytes())
    store.save_weight(weight, sha)
    pool = PoolStep(InProcessPool(evaluators[:1]), store, num_layers=arch.num_layers,
                    n_windows={"calibration": 8}, batch_size=8, timeout_s=60)
    sent = []
    monkeypatch.setattr(type(pool.sources), "by_reference",
                        lambda self, shas: (sent.extend(shas), self.refs.update({s: weight for s in shas})))
    request = StepRequest("calibration", Mask(attn_removed={1}), tuned=((1, sha),), candidates=(0, 1),
                          top_k=0, checkpoint_every=1)
    readable = pool.run(request)
    assert sent == []
    evaluators[0]._sprint_weights.weights.clear()  # a replica that never held it
    store.weight_path(sha).rename(tmp_path / "elsewhere")  # the replica no longer sees the file
    hidden = pool.run(request)
    assert sent == [sha] and hidden["nll_sum"] == readable["nll_sum"] and hidden["sensitivity"] == readable["sensitivity"]


def test_a_remembered_winner_is_refitted_alike_on_one_replica_and_on_two(tiny_setup, replicas, tmp_path):
    """SPRINT's memory on a pool: a remembered score outside the top wins; its refit is summed over the
    shards and solved again, after the rescore, and equals the refit of a step that tunes it afresh."""
    import dataclasses

    from search_spaces.latency import BlockCosts

    evaluators, windows = replicas
    arch = evaluators[0].arch
    n = {name: w.shape[0] for name, w in windows.items()}
    one = PoolStep(InProcessPool(evaluators[:1]), StepStore(tmp_path / "one"), num_layers=arch.num_layers,
                   n_windows=n, batch_size=2, timeout_s=60)
    pool = InProcessPool(evaluators)
    two = PoolStep(pool, StepStore(tmp_path / "two"), num_layers=arch.num_layers, n_windows=n, batch_size=2,
                   timeout_s=60)
    request = StepRequest("calibration", Mask(), candidates=tuple(present_blocks(Mask(), arch.num_layers)),
                          costs=BlockCosts(0.0, 0.1, 0.25), top_k=2, ridge=0.1, checkpoint_every=1)
    top = one.run(request)["top"]
    outside = next(s for s in present_blocks(Mask(), arch.num_layers) if s not in top and s % 2 == 0)
    remembering = dataclasses.replace(request, remembered=((outside, 0.0),))
    whole, sharded = one.run(remembering), two.run(remembering)
    for result in (whole, sharded):
        assert result["top"] == top and [t["block"] for t in result["tuned"]] == [*top, outside]
        assert result["choice"]["block"] == outside and result["choice"]["status"] == "ok"
        assert result["choice"]["sensitivity"] == 0.0 and result["choice"]["weight"] is not None
    afresh = one.run(dataclasses.replace(request, candidates=(outside,), top_k=1))["choice"]
    np.testing.assert_allclose(whole["choice"]["weight"], afresh["weight"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sharded["choice"]["weight"], afresh["weight"], rtol=0, atol=1e-5)
    # On the pool: the top's refits, their rescore, then the winner's moments; every phase on both replicas.
    phases = [(phase, r) for method, phase, r in pool.log if method == "sprint_shard"]
    assert phases == [(p, r) for p in ("scores", "moments", "rescore", "moments") for r in (0, 1)]
    assert sorted(p.stem for p in (tmp_path / "two" / "sprint" / "weights").iterdir()) == [sharded["choice"]["sha"]]
