"""One SPRINT step on a tiny model: sensitivities, refit targets, memory and no-MLP scores as defined;
checkpoints and reuse change nothing."""

from __future__ import annotations

import math

import pytest
import torch

import actors.sprint
from actors.forward import LeanDecoder
from actors.sprint import Checkpoints, TunedSwap, mlp_input, run_step
from search_spaces import Block, Mask
from search_spaces.latency import BlockCosts
from search_spaces.sprint import StepRequest, present_blocks, rescore_after, target_block
from tests.tiny import tiny_arch, tiny_model

COSTS = BlockCosts(1.0, 1.0, 2.0)
#: Attention 1 and MLP 2 removed: the windows of MLP 0 (to MLP 1), MLP 1 and attention 2 (to MLP 3) hold them.
HOLES = Mask(attn_removed={1}, mlp_removed={2})


@pytest.fixture
def setup(family):
    arch = tiny_arch(family)
    decoder = LeanDecoder(tiny_model(family), arch)
    windows = torch.randint(0, arch.vocab_size, (6, 20), generator=torch.Generator().manual_seed(1))
    return arch, decoder, windows


def window_model(mask: Mask, s: int, num_layers: int) -> Mask:
    """The model SPRINT's ``is_gt`` forward runs from ``s`` to its target: every block on (written
    out here, independently of ``search_spaces.sprint.restored``)."""
    t = target_block(mask, num_layers, s)
    attn = {j // 2 for j in range(s, t + 1) if j % 2 == 0}
    mlp = {j // 2 for j in range(s, t + 1) if j % 2 == 1}
    return Mask(mask.attn_removed - attn, mask.mlp_removed - mlp)


def streams(decoder, windows, mask: Mask, s: int, reference: str = "window") -> tuple[torch.Tensor, torch.Tensor]:
    """(o, c) of candidate ``s`` by full forwards: the reference and the stream without ``s``, after target(s)."""
    L = decoder.arch.num_layers
    t = target_block(mask, L, s)
    with torch.inference_mode():
        h = decoder.run(decoder.embed(windows), mask, 0, s)  # entering s
        o = decoder.run(h, window_model(mask, s, L) if reference == "window" else mask, s, t + 1)
        c = decoder.run(h, mask.remove(Block.from_index(s)), s, t + 1)
    return o, c


def score(o: torch.Tensor, c: torch.Tensor, metric: str = "l1") -> float:
    """SPRINT's ``add_batch`` for ``<metric>_sentence``: per sequence, |o - c| / |o| over tokens x hidden."""
    o, c = o.flatten(1).double(), c.flatten(1).double()
    if metric == "l1":  # add_batch_l2 sums sqrt(x**2) = |x|: an L1 norm, as add_batch_l1
        return float(((o - c).abs().sum(1) / o.abs().sum(1)).sum())
    return float(((o - c).norm(dim=1) / o.norm(dim=1)).sum())


def naive_sensitivity(decoder, windows, mask: Mask, s: int, metric: str = "l1", reference: str = "window") -> float:
    return score(*streams(decoder, windows, mask, s, reference), metric)


def step(decoder, windows, mask, *, tuned=(), weights=None, candidates=None, known=(), top_k=0, memo=None,
         parent=None, unchanged_before=0, every=1, **options):
    candidates = present_blocks(mask, decoder.arch.num_layers) if candidates is None else candidates
    request = StepRequest("calibration", mask, tuned, tuple(candidates), tuple(known), COSTS, top_k=top_k, ridge=0.1,
                          checkpoint_every=every, parent=parent, unchanged_before=unchanged_before, **options)
    return run_step(decoder, windows, 4, request, weights or {}, memo if memo is not None else Checkpoints())


@pytest.mark.parametrize("metric", ["l1", "l2"])
@pytest.mark.parametrize("reference", ["window", "current"])
def test_sensitivity_is_the_definition(setup, metric, reference):
    arch, decoder, windows = setup
    result = step(decoder, windows, HOLES, metric=metric, reference=reference)
    for s in present_blocks(HOLES, arch.num_layers):
        expected = naive_sensitivity(decoder, windows, HOLES, s, metric, reference)
        assert result["sensitivity"][s] == pytest.approx(expected, rel=1e-5), s
    with torch.inference_mode():
        expected = decoder.nll(decoder.run(decoder.embed(windows), HOLES), windows)
    assert result["nll_sum"] == pytest.approx(expected[0], rel=1e-6) and result["tokens"] == expected[1]


def test_the_window_reference_runs_removed_blocks_again(setup):
    arch, decoder, windows = setup
    window = step(decoder, windows, HOLES)["sensitivity"]
    current = step(decoder, windows, HOLES, reference="current")["sensitivity"]
    holes = {1, 3, 4}  # MLP 0's window holds attention 1; those of MLP 1 and attention 2 hold MLP 2
    for s in present_blocks(HOLES, arch.num_layers):
        assert (window[s] != pytest.approx(current[s], rel=1e-3)) == (s in holes), s


def test_a_window_runs_a_removed_mlp_with_the_refit_it_carried(setup):
    """SPRINT refits down_proj in place and never undoes it: when that MLP is removed later and a
    window runs it again, it runs with the refit. A request names such weights in ``tuned``."""
    arch, decoder, windows = setup
    weight = _perturbed(decoder, 2, seed=5)
    plain = step(decoder, windows, HOLES)
    carried = step(decoder, windows, HOLES, tuned=((2, "w2"),), weights={"w2": weight})
    assert carried["nll_sum"] == plain["nll_sum"]  # the model itself does not run MLP 2
    for s in present_blocks(HOLES, arch.num_layers):  # MLP 1 and attention 2: their windows hold MLP 2
        assert (carried["sensitivity"][s] != plain["sensitivity"][s]) == (s in (3, 4)), s
    with TunedSwap(decoder, {2: weight}):
        assert carried["sensitivity"][3] == pytest.approx(naive_sensitivity(decoder, windows, HOLES, 3), rel=1e-5)
    current = step(decoder, windows, HOLES, tuned=((2, "w2"),), weights={"w2": weight}, reference="current")
    assert current["sensitivity"] == step(decoder, windows, HOLES, reference="current")["sensitivity"]


def _perturbed(decoder, layer: int, seed: int) -> torch.Tensor:
    w = decoder.layers[layer].mlp.down_proj.weight.detach()
    return (w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))).float()


def test_checkpointed_step_equals_step_from_embeddings_and_reuse_is_exact(setup):
    arch, decoder, windows = setup
    memo = Checkpoints()
    before = Mask(mlp_removed={0})
    first = step(decoder, windows, before, memo=memo)
    pruned = Block(2, "attn").index
    after = before.remove(Block.from_index(pruned))
    weight = _perturbed(decoder, 2, seed=4)  # stands in for the refit of the MLP after the pruned block
    tuned, weights = ((2, "w2"),), {"w2": weight}
    rescore = rescore_after(after, arch.num_layers, pruned)
    known = [(s, first["sensitivity"][s]) for s in present_blocks(after, arch.num_layers) if s not in rescore]
    kwargs = dict(tuned=tuned, weights=weights, candidates=rescore, known=known, top_k=2)
    fast = step(decoder, windows, after, memo=memo, parent=first["state"], unchanged_before=pruned, **kwargs)
    slow = step(decoder, windows, after, **kwargs)
    assert fast["walk_start"] > 0 and slow["walk_start"] == 0  # the memo saved the prefix
    assert fast["sensitivity"] == slow["sensitivity"] and fast["nll_sum"] == slow["nll_sum"]
    assert fast["tuned"] == slow["tuned"] and fast["choice"]["sha"] == slow["choice"]["sha"]
    # The same state again: the walk starts at the checkpoint before the first candidate.
    again = step(decoder, windows, after, memo=memo, **kwargs)
    assert again["walk_start"] >= fast["walk_start"] and again["sensitivity"] == fast["sensitivity"]
    # Scores that were reused are what a full re-scoring of the new state gives.
    full = step(decoder, windows, after, tuned=tuned, weights=weights)
    for s, value in known:
        assert full["sensitivity"][s] == pytest.approx(value, rel=1e-6)
    for s in rescore:
        assert full["sensitivity"][s] == pytest.approx(fast["sensitivity"][s], rel=1e-6)
    with TunedSwap(decoder, {2: weight}):  # and the sensitivities of the tuned state follow the definition
        for s in rescore:
            assert fast["sensitivity"][s] == pytest.approx(naive_sensitivity(decoder, windows, after, s), rel=1e-5)


def refit_problem(decoder, windows, mask: Mask, s: int, aim: torch.Tensor, ridge: float):
    """The ridge least squares of actors/refit.py from full forwards, in float64: the objective ``f``
    over the down_proj of target(s) when the stream without ``s`` after it should reproduce ``aim``,
    and its minimiser."""
    t = target_block(mask, decoder.arch.num_layers, s)
    down = decoder.layers[t // 2].mlp.down_proj
    with torch.inference_mode():
        h = decoder.run(decoder.run(decoder.embed(windows), mask, 0, s), mask.remove(Block.from_index(s)), s, t)
        z = mlp_input(decoder, t // 2, h, decoder.arch.intermediate_size).reshape(-1, down.in_features).double()
        r = (aim - h - (0.0 if down.bias is None else down.bias)).reshape(-1, down.out_features).double()
    zz, w0 = z.T @ z, down.weight.detach().double()
    lam = ridge * float(zz.diagonal().mean()) / z.shape[0]

    def f(w) -> float:
        w = torch.as_tensor(w).double()
        return float((z @ w.T - r).square().sum() + lam * (w - w0).square().sum())

    return f, torch.linalg.solve(zz + lam * torch.eye(zz.shape[0], dtype=zz.dtype), z.T @ r + lam * w0.T).T


@pytest.mark.parametrize("refit_target", ["local", "dense"])
def test_the_refit_aims_at_the_reference_or_the_dense_stream(setup, refit_target):
    arch, decoder, windows = setup
    # MLP 1 alone: attention 1 is gone before it, its window holds MLP 2: local and dense aims differ.
    result = step(decoder, windows, HOLES, candidates=[3], top_k=1, refit_target=refit_target)
    choice = result["choice"]
    assert choice["status"] == "ok", "the refit was refused: nothing to compare"
    s, t = choice["block"], choice["target"]
    assert (s, t) == (3, 7)
    local, _ = streams(decoder, windows, HOLES, s)  # the stream the score compares with
    with torch.inference_mode():
        dense = decoder.run(decoder.embed(windows), Mask(), 0, t + 1)
    f_local, best_local = refit_problem(decoder, windows, HOLES, s, local, ridge=0.1)
    f_dense, best_dense = refit_problem(decoder, windows, HOLES, s, dense, ridge=0.1)
    # The refit attains the minimum of its own target's objective (the system is ill-conditioned:
    # compare objectives, not weights), and not that of the other target.
    f, best, other_f, other_best = ((f_local, best_local, f_dense, best_dense) if refit_target == "local"
                                    else (f_dense, best_dense, f_local, best_local))
    assert f(choice["weight"]) == pytest.approx(f(best), rel=1e-3, abs=1e-6)
    assert choice["after"] == pytest.approx(f(best), rel=1e-3, abs=1e-6)
    assert other_f(choice["weight"]) > 1.5 * other_f(other_best) + 1e-6
    # The tuned score: the forward without s with the refitted weights, against the reference.
    with TunedSwap(decoder, {t // 2: torch.as_tensor(choice["weight"])}):
        _, c = streams(decoder, windows, HOLES, s)
    assert choice["sensitivity"] == pytest.approx(score(local, c), rel=1e-4)
    if refit_target == "local":
        assert choice["sensitivity"] < choice["untuned"]  # aimed at what it is scored against


def test_tuned_choice_rescore_matches_a_forward_with_its_refitted_weights(setup):
    arch, decoder, windows = setup
    result = step(decoder, windows, Mask(), top_k=3)
    choice = result["choice"]
    assert [t["block"] for t in result["tuned"]] == result["top"] and len(result["top"]) == 3
    assert choice["block"] in result["top"]
    for t in result["tuned"]:
        assert t["status"] in ("ok", "no-mlp") and (t["status"] == "no-mlp" or t["after"] <= t["before"])
    if choice["status"] != "ok":
        pytest.skip("the best candidate of this model needed no refit")
    layer = choice["target"] // 2
    o, _ = streams(decoder, windows, Mask(), choice["block"])  # the model as it is
    with TunedSwap(decoder, {layer: torch.as_tensor(choice["weight"])}):
        _, c = streams(decoder, windows, Mask(), choice["block"])  # without the block, refitted after it
    assert choice["sensitivity"] == pytest.approx(score(o, c), rel=1e-5)
    assert choice["sensitivity"] <= choice["untuned"]


@pytest.mark.parametrize("no_mlp_score", ["inf", "untuned"])
def test_a_candidate_with_no_mlp_after_it(setup, no_mlp_score):
    arch, decoder, windows = setup
    last = 2 * arch.num_layers - 1
    result = step(decoder, windows, Mask(), top_k=2 * arch.num_layers, no_mlp_score=no_mlp_score)
    record = next(t for t in result["tuned"] if t["block"] == last)
    assert record["status"] == "no-mlp"
    assert record["sensitivity"] == (math.inf if no_mlp_score == "inf" else record["untuned"])
    assert result["choice"]["block"] != last or no_mlp_score == "untuned"


def test_remembered_scores_join_the_choice_and_are_not_refitted(setup, monkeypatch):
    arch, decoder, windows = setup
    refitted: list[list[int]] = []
    moments = actors.sprint.StepWork.moments
    monkeypatch.setattr(actors.sprint.StepWork, "moments",
                        lambda self, top: refitted.append(list(top)) or moments(self, top))
    fresh = step(decoder, windows, Mask(), top_k=3)
    top = fresh["top"]
    # A remembered candidate in the top is not refitted again; its score is the one remembered.
    refitted.clear()
    kept = step(decoder, windows, Mask(), top_k=3, remembered=((top[0], 1e6),))
    assert kept["top"] == top and refitted[0] == top[1:]
    assert next(t for t in kept["tuned"] if t["block"] == top[0]) == {
        "block": top[0], "target": target_block(Mask(), arch.num_layers, top[0]), "sensitivity": 1e6,
        "untuned": fresh["sensitivity"][top[0]], "status": "remembered", "before": None, "after": None}
    # One outside the top that scores lowest wins: its refit is computed again, the same as a fresh one.
    outside = next(s for s in fresh["sensitivity"] if s not in top and s % 2 == 0)
    refitted.clear()
    won = step(decoder, windows, Mask(), top_k=3, remembered=((outside, 0.0),))
    assert refitted == [top, [outside]] and [t["block"] for t in won["tuned"]] == [*top, outside]
    choice = won["choice"]
    assert choice["block"] == outside and choice["sensitivity"] == 0.0 and choice["status"] == "ok"
    alone = step(decoder, windows, Mask(), candidates=[outside], top_k=1)
    assert alone["choice"]["block"] == outside and alone["choice"]["sha"] == choice["sha"]
    with pytest.raises(ValueError, match=r"blocks \[2\] are removed"):
        step(decoder, windows, Mask(attn_removed={1}), top_k=1, remembered=((2, 0.5),))


def test_tuned_swap_restores_the_replica(setup):
    arch, decoder, windows = setup
    with torch.inference_mode():
        before = decoder.forward_logits(windows, Mask())
        with TunedSwap(decoder, {1: _perturbed(decoder, 1, seed=7)}):
            inside = decoder.forward_logits(windows, Mask())
        after = decoder.forward_logits(windows, Mask())
    assert torch.equal(before, after) and not torch.allclose(before, inside)


def test_bad_requests_are_named(setup):
    arch, decoder, windows = setup
    with pytest.raises(ValueError, match="were not passed"):
        step(decoder, windows, Mask(), tuned=((1, "nope"),))
    with pytest.raises(ValueError, match=r"blocks \[2\] are removed"):
        step(decoder, windows, Mask(attn_removed={1}), candidates=[0, 2])
    with pytest.raises(ValueError, match="metric 'l3' is not one of l1, l2"):
        step(decoder, windows, Mask(), metric="l3")
