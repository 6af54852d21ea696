"""SPRINT's pure bookkeeping of the paper's semantics: windows, memory, no-MLP scores, requests."""

from __future__ import annotations

import math

import pytest

from search_spaces import Arch, Block, Mask
from search_spaces.latency import BlockCosts, speedup
from search_spaces.sprint import (StepRequest, best_tuned, refit_candidates, remember, restored, target_block,
                                  tuned_records, window_removed)

ARCH = Arch(family="llama", num_layers=8, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=True)
COSTS = BlockCosts(0.0, 1.0, 2.0)


def test_windows_and_the_model_they_run():
    mask = Mask(attn_removed={3}, mlp_removed={2, 5})
    assert window_removed(mask, 8, Block(2, "attn").index) == [5, 6]  # MLP 2, attention 3, up to MLP 3
    assert window_removed(mask, 8, Block(1, "mlp").index) == [5, 6]
    assert window_removed(mask, 8, Block(0, "attn").index) == []
    assert restored(mask, [5, 6]) == Mask(mlp_removed={5})
    assert restored(Mask(mlp_width={1: 64}), []) == Mask(mlp_width={1: 64})


def _records(request: StepRequest, top, ranked, fits, rescored):
    return tuned_records(request, 8, top, ranked, fits, rescored)


def test_tuned_records_hold_the_top_and_the_remembered_scores():
    mask = Mask(mlp_removed={7})
    last_mlp = Block(6, "mlp").index  # no MLP left after it: nothing to refit
    request = StepRequest("c", mask, remembered=((0, 0.3), (4, 0.9)))
    ranked = {0: 1.0, 2: 0.5, 4: 2.0, last_mlp: 0.1}
    top = [last_mlp, 2, 4]
    assert refit_candidates(request, top) == [last_mlp, 2]
    fits = {2: {"status": "ok", "before": 3.0, "after": 1.0}}
    records = _records(request, top, ranked, fits, {2: 0.25})
    assert [(r["block"], r["status"], r["sensitivity"]) for r in records] == [
        (last_mlp, "no-mlp", math.inf), (2, "ok", 0.25), (4, "remembered", 0.9), (0, "remembered", 0.3)]
    assert best_tuned(records, COSTS)["block"] == 2  # 0.25 / 1 beats 0.3 / 1 and 0.9 / 1
    untuned = _records(StepRequest("c", mask, no_mlp_score="untuned"), top, ranked, fits, {2: 0.25})
    assert untuned[0]["sensitivity"] == 0.1 and best_tuned(untuned, COSTS)["block"] == last_mlp
    failed = _records(StepRequest("c", mask), [2], ranked, {2: {"status": "singular"}}, {})
    assert failed[0]["sensitivity"] == 0.5  # a refused refit: the score with the weights as they are


def test_memory_keeps_scores_whose_window_ends_before_the_removed_block():
    mask = Mask()
    tuned = [{"block": b, "target": target_block(mask, 8, b), "status": s, "sensitivity": v}
             for b, s, v in ((0, "ok", 0.1), (1, "remembered", 0.2), (4, "ok", 0.3), (6, "singular", 0.4),
                             (15, "no-mlp", math.inf), (8, "ok", 0.5))]
    # Removing block 8 (attention 4): the windows of 0 (to 1), 1 (to 3) and 4 (to 5) end before it;
    # that of 6 (to MLP 3 = 7) too; block 8 itself goes; no-mlp scores are never remembered.
    assert remember(tuned, 8) == ((0, 0.1), (1, 0.2), (4, 0.3), (6, 0.4))
    # Removing MLP 2 (5): block 4's window reached it (its refit was of MLP 2), 6's did not.
    assert remember(tuned, 5) == ((0, 0.1), (1, 0.2))


def test_requests_carry_the_semantics_and_key_on_them():
    base = StepRequest("calibration", Mask(attn_removed={2}), ((3, "ab"),), (4, 5), ((0, 0.5),), COSTS, top_k=3)
    assert (base.metric, base.reference, base.refit_target, base.no_mlp_score, base.remembered) == \
        ("l1", "window", "local", "inf", ())
    other = StepRequest("calibration", Mask(attn_removed={2}), ((3, "ab"),), (4, 5), ((0, 0.5),), COSTS, top_k=3,
                        metric="l2", reference="current", refit_target="dense", no_mlp_score="untuned",
                        remembered=((1, 0.25),))
    for request in (base, other):
        assert StepRequest.from_dict(request.to_dict()) == request
    assert base.key("m", "w") != other.key("m", "w")
    for field, value in (("metric", "l3"), ("reference", "dense"), ("refit_target", "global"), ("no_mlp_score", 0)):
        with pytest.raises(ValueError, match=f"SPRINT step {field} .* is not one of"):
            StepRequest("c", Mask(), **{field: value})


def test_without_a_fixed_part_the_speedup_is_the_kept_blocks_share():
    costs = BlockCosts(5.0, 1.0, 2.0)
    mask = Mask(attn_removed={0, 1}, mlp_removed={3})
    assert speedup(mask, ARCH, costs.blocks_only()) == pytest.approx(24.0 / (24.0 - 2.0 - 2.0))
    assert speedup(mask, ARCH, costs) == pytest.approx(29.0 / 25.0)
    everything = Mask(attn_removed=set(range(8)), mlp_removed=set(range(8)))
    assert speedup(everything, ARCH, costs.blocks_only()) == math.inf
