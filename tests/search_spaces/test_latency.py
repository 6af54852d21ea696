"""Latency arithmetic and SPRINT's pure bookkeeping (comparison points, checkpoints, re-scoring)."""

from __future__ import annotations

import math

import pytest

from search_spaces import Arch, Block, Mask
from search_spaces.latency import (BlockCosts, LatencyTable, Scenario, best_candidate, check_costs, importance,
                                   mask_latency, rank_candidates, speedup)
from search_spaces.sprint import (StepRequest, checkpoint_before, checkpoint_blocks, present_blocks, rescore_after,
                                  state_key, target_block, tuned_fingerprint, tuned_items)

ARCH = Arch(family="llama", num_layers=8, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=True)
COSTS = BlockCosts(fixed=2.0, attn=1.0, mlp=3.0)  # dense: 2 + 8 * 4 = 34


def test_dense_latency_and_speedup_of_removed_blocks():
    assert mask_latency(Mask(), ARCH, COSTS) == 34.0
    assert speedup(Mask(), ARCH, COSTS) == 1.0
    mask = Mask(attn_removed={0, 1}, mlp_removed={5})
    assert mask_latency(mask, ARCH, COSTS) == 34.0 - 2 * 1.0 - 3.0
    assert speedup(mask, ARCH, COSTS) == pytest.approx(34.0 / 29.0)


def test_narrowed_blocks_cost_in_proportion_to_their_width():
    mask = Mask(head_units={2: 1}, mlp_width={3: 64})
    assert mask_latency(mask, ARCH, COSTS) == pytest.approx(34.0 - 0.5 * 1.0 - 0.75 * 3.0)


def test_scenario_adds_decode_steps_and_names_missing_measurements():
    table = LatencyTable("dev", "fp", {"prefill:128": COSTS, "decode:128": BlockCosts(0.1, 0.01, 0.02)},
                         {"prefill:128": 34.0, "decode:128": 0.34})
    total = table.scenario_costs(Scenario(prompt=128, generate=10))
    assert (total.fixed, total.attn, total.mlp) == pytest.approx((3.0, 1.1, 3.2))
    assert table.has(Scenario(128, 10)) and not table.has(Scenario(512, 0))
    with pytest.raises(KeyError, match="no prefill:512 measurement"):
        table.scenario_costs(Scenario(512, 0))
    assert LatencyTable.from_dict(table.to_dict()) == table
    merged = table.merged(LatencyTable("dev", "fp", {"prefill:512": COSTS}, {"prefill:512": 34.0}))
    assert merged.has(Scenario(512, 0)) and merged.has(Scenario(128, 10))


def test_ranking_is_sensitivity_per_second_saved_with_ties_to_the_lower_index():
    # Block 1 (MLP) is twice as sensitive as block 0 (attention) but saves three times as much.
    sens = {0: 1.0, 1: 2.0, 2: 1.0, 4: math.nan}
    assert rank_candidates(sens, COSTS) == [1, 0, 2, 4]
    assert best_candidate(sens, COSTS) == 1 and best_candidate({}, COSTS) is None
    assert importance(1.0, 0.0) == math.inf and importance(math.nan, 1.0) == math.inf
    assert check_costs([("prefill:512", BlockCosts(1.0, -0.1, 1.0))])[0].startswith("prefill:512: removing one attn")
    assert check_costs([("prefill:512", COSTS)]) == []


def test_target_block_is_the_next_remaining_mlp_else_the_next_block():
    mask = Mask(mlp_removed={1, 2})
    assert target_block(mask, 8, Block(1, "attn").index) == Block(3, "mlp").index  # mlp1, mlp2 are gone
    assert target_block(mask, 8, Block(0, "attn").index) == Block(0, "mlp").index
    assert target_block(mask, 8, Block(0, "mlp").index) == Block(3, "mlp").index
    last = Block(7, "mlp").index
    assert target_block(mask, 8, last) == last
    assert target_block(Mask(mlp_removed={7}), 8, Block(7, "attn").index) == last
    # No MLP left after it: the block right after it (SPRINT's get_tuning_subid), here attention 7.
    assert target_block(Mask(mlp_removed={6, 7}), 8, Block(5, "mlp").index) == Block(6, "attn").index
    assert target_block(Mask(mlp_removed={7}), 8, Block(6, "mlp").index) == Block(7, "attn").index


def test_checkpoints_every_quarter_of_the_layers():
    assert checkpoint_blocks(8) == (0, 4, 8, 12)
    assert checkpoint_blocks(30) == (0, 14, 28, 42, 56)
    assert checkpoint_blocks(8, every=3) == (0, 6, 12)
    assert [checkpoint_before(i, (0, 4, 8, 12)) for i in (0, 3, 4, 11, 15)] == [0, 0, 4, 8, 12]


def _window(mask: Mask, s: int) -> set[int]:
    return set(range(s, target_block(mask, 8, s) + 1))


@pytest.mark.parametrize("before", [Mask(), Mask(mlp_removed={2, 3}), Mask(attn_removed={4}, mlp_removed={5, 6}),
                                    Mask(mlp_removed={7})], ids=str)
def test_rescore_after_is_exactly_the_candidates_whose_window_or_input_changed(before):
    for pruned in present_blocks(before, 8):
        after = before.remove(Block.from_index(pruned))
        refit = target_block(before, 8, pruned)
        expected = [s for s in present_blocks(after, 8)
                    if s > pruned or target_block(after, 8, s) != target_block(before, 8, s)
                    or {pruned, refit} & _window(after, s)]
        assert rescore_after(after, 8, pruned) == expected


def test_state_keys_and_tuned_fingerprints():
    mask = Mask(attn_removed={1})
    assert tuned_fingerprint(()) == ""
    assert tuned_fingerprint(((3, "ab"),)).startswith("+tuned:")
    assert tuned_items({3: "ab", 5: "cd"}, Mask(mlp_removed={5})) == ((3, "ab"),)
    assert state_key(mask, ()) != state_key(mask, ((3, "ab"),)) != state_key(Mask(), ((3, "ab"),))
    assert state_key(mask.remove(Block(3, "mlp")), ((3, "ab"),)) == state_key(mask.remove(Block(3, "mlp")), ())


def test_step_requests_round_trip_and_key_without_memo_hints():
    request = StepRequest("calibration", Mask(attn_removed={2}), ((3, "ab"),), (4, 5), ((0, 0.5),), COSTS,
                          top_k=3, ridge=0.1, checkpoint_every=2, parent="p", unchanged_before=4)
    assert StepRequest.from_dict(request.to_dict()) == request
    hinted = StepRequest.from_dict({**request.to_dict(), "parent": None, "unchanged_before": 0})
    assert hinted.key("m", "w") == request.key("m", "w") != request.key("m", "other")
