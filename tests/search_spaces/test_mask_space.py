"""The mask space of Optuna studies: grid, band, and a repair that always lands in the band."""

from __future__ import annotations

import random

import pytest

from search_spaces import Arch, Mask, ratio
from search_spaces.mask_space import MaskSpace, check_optuna, largest_block_share
from tests.tiny import tiny_arch

SMOL = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)


def test_params_and_masks_round_trip():
    space = MaskSpace(SMOL, 0.1, widths=True, mlp_group=256, head_group=1)
    mask = Mask({3}, {7}, ((4, 2),), ((5, 512),))
    params = space.params(mask)
    assert params["attn_3"] == 0 and params["mlp_7"] == 0 and params["attn_4"] == 2 and params["mlp_5"] == 512
    assert params["attn_0"] == 3 and params["mlp_0"] == 1536
    assert space.mask(params) == mask
    assert space.removal(params) == ratio(mask, SMOL) * space.dense
    # Off the grid: 500 channels is not a multiple of 256; widths in a whole-block space.
    assert space.params(Mask(mlp_width=((5, 500),))) is None
    assert MaskSpace(SMOL, 0.1).params(mask) is None
    assert MaskSpace(SMOL, 0.1).params(Mask({3}, {7})) is not None


def test_default_band_holds_any_greedy_overshoot():
    space = MaskSpace(SMOL, 0.1)
    assert space.band == pytest.approx((0.1, 0.1 + largest_block_share(SMOL)))
    assert largest_block_share(SMOL) == pytest.approx(0.0198, abs=1e-4)  # one MLP block of SmolLM2


@pytest.mark.parametrize("widths", [False, True])
@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_repair_always_lands_in_the_band(widths, target):
    space = MaskSpace(SMOL, target, widths=widths, mlp_group=256)
    rng = random.Random(0)
    names = [c.name for c in space.choices]
    for _ in range(200):
        keep = rng.random()
        proposed = {c.name: (rng.choice(c.levels) if rng.random() > keep else c.full) for c in space.choices}
        order = names[:]
        rng.shuffle(order)
        repaired = space.repair(proposed, order)
        assert space.contains(space.mask(repaired))
        assert space.repair(repaired, order) == repaired  # in the band: unchanged


def test_repair_is_deterministic_and_keeps_what_it_can():
    space = MaskSpace(tiny_arch("llama"), 0.3)
    names = [c.name for c in space.choices]
    everything = {c.name: 0 for c in space.choices}  # remove every block: far above the band
    a, b = space.repair(everything, names), space.repair(everything, names)
    assert a == b and space.contains(space.mask(a))
    # Visited first, removals are kept until the band's top would be passed.
    assert a[names[0]] == 0


def test_problems_name_the_fix():
    assert MaskSpace(SMOL, 0.1).problems() == []
    narrow = MaskSpace(SMOL, 0.1, 0.001)
    assert any("search.ratio_tolerance" in p for p in narrow.problems())
    assert MaskSpace(SMOL, 0.1, 0.005, widths=True, mlp_group=256).problems() == []  # groups are small steps
    assert any("cannot be reached" in p for p in MaskSpace(SMOL, 0.9).problems())
    assert any("search.mlp_group" in p for p in MaskSpace(SMOL, 0.1, widths=True, mlp_group=100).problems())
    # A warm start from BlockPruner needs room for its overshoot.
    assert check_optuna(SMOL, 0.1, 0.005, widths=True, mlp_group=256, head_group=1, warm_start="none") == []
    problems = check_optuna(SMOL, 0.1, 0.005, widths=True, mlp_group=256, head_group=1, warm_start="blockpruner")
    assert len(problems) == 1 and "search.warm_start=none" in problems[0]
    with pytest.raises(ValueError, match="repair order"):
        MaskSpace(SMOL, 0.1).repair({}, ["attn_0"])


def test_a_prior_repairs_by_harm_restoring_the_worst_and_removing_the_mildest():
    """Harm: removing layer l's block costs l (attention) or 100 + l (MLP): attention blocks of early
    layers are the mildest. Too much removed: the most harmful removals are restored. Too little:
    the mildest blocks are removed. Unknown choices rank in the middle."""
    space = MaskSpace(SMOL, 0.1)
    harm = {c.name: (c.layer if c.kind == "attn" else 100 + c.layer) for c in space.choices}
    full = {c.name: c.full for c in space.choices}
    tiebreak = [c.name for c in space.choices]

    over = {**full, **{f"attn_{l}": 0 for l in range(30)}, "mlp_29": 0, "mlp_28": 0}  # far past the top
    repaired = space.repair(over, space.repair_order(over, harm, tiebreak))
    mask = space.mask(repaired)
    assert space.contains(mask)
    assert not mask.mlp_removed  # both MLP removals (the most harmful) were restored first ...
    assert mask.attn_removed == set(range(len(mask.attn_removed)))  # ... then the latest attention layers

    under = dict(full)  # nothing removed: the mildest blocks are removed until the floor
    mask = space.mask(space.repair(under, space.repair_order(under, harm, tiebreak)))
    assert space.contains(mask) and not mask.mlp_removed
    assert mask.attn_removed == set(range(len(mask.attn_removed)))  # early attention layers first

    unknown = {k: v for k, v in harm.items() if k != "attn_0"}  # attn_0 unknown: ranked mid-way
    order = space.repair_order(under, unknown, tiebreak)
    assert order[-1] == "attn_1" and abs(order.index("attn_0") - len(order) // 2) <= 1
