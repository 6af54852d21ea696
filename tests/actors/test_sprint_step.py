"""One SPRINT step on a tiny model: sensitivities as defined, checkpoints and reuse change nothing."""

from __future__ import annotations

import pytest
import torch

from actors.forward import LeanDecoder
from actors.sprint import Checkpoints, TunedSwap, run_step
from search_spaces import Block, Mask
from search_spaces.latency import BlockCosts
from search_spaces.sprint import StepRequest, present_blocks, rescore_after, target_block
from tests.tiny import tiny_arch, tiny_model

COSTS = BlockCosts(1.0, 1.0, 2.0)


@pytest.fixture
def setup(family):
    arch = tiny_arch(family)
    decoder = LeanDecoder(tiny_model(family), arch)
    windows = torch.randint(0, arch.vocab_size, (6, 20), generator=torch.Generator().manual_seed(1))
    return arch, decoder, windows


def naive_sensitivity(decoder, windows, mask: Mask, s: int) -> float:
    """SPEC's definition with two full forwards: |o - c| / |o| per sequence after target(s), summed."""
    t = target_block(mask, decoder.arch.num_layers, s)
    with torch.inference_mode():
        h = decoder.embed(windows)
        o = decoder.run(h, mask, 0, t + 1).flatten(1)
        c = decoder.run(h, mask.remove(Block.from_index(s)), 0, t + 1).flatten(1)
    return float(((o - c).norm(dim=1) / o.norm(dim=1)).sum())


def step(decoder, windows, mask, *, tuned=(), weights=None, candidates=None, known=(), top_k=0, memo=None,
         parent=None, unchanged_before=0, every=1):
    candidates = present_blocks(mask, decoder.arch.num_layers) if candidates is None else candidates
    request = StepRequest("calibration", mask, tuned, tuple(candidates), tuple(known), COSTS, top_k=top_k, ridge=0.1,
                          checkpoint_every=every, parent=parent, unchanged_before=unchanged_before)
    return run_step(decoder, windows, 4, request, weights or {}, memo if memo is not None else Checkpoints())


def test_sensitivity_is_the_spec_definition(setup):
    arch, decoder, windows = setup
    mask = Mask(attn_removed={1}, mlp_removed={2})
    result = step(decoder, windows, mask)
    for s in present_blocks(mask, arch.num_layers):
        assert result["sensitivity"][s] == pytest.approx(naive_sensitivity(decoder, windows, mask, s), rel=1e-5)
    with torch.inference_mode():
        expected = decoder.nll(decoder.run(decoder.embed(windows), mask), windows)
    assert result["nll_sum"] == pytest.approx(expected[0], rel=1e-6) and result["tokens"] == expected[1]


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
    with TunedSwap(decoder, {layer: torch.as_tensor(choice["weight"])}):
        pruned = Mask().remove(Block.from_index(choice["block"]))
        with torch.inference_mode():
            h = decoder.embed(windows)
            c = decoder.run(h, pruned, 0, choice["target"] + 1).flatten(1)
    with torch.inference_mode():
        o = decoder.run(h, Mask(), 0, choice["target"] + 1).flatten(1)
    assert choice["sensitivity"] == pytest.approx(float(((o - c).norm(dim=1) / o.norm(dim=1)).sum()), rel=1e-5)
    assert choice["sensitivity"] <= choice["untuned"]


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
