"""Level swaps (evolution with widths): levels move between layers of one kind, the parameter count
moves only by the norms of blocks that reach or leave level 0, and never below the floor."""

from __future__ import annotations

import random

import pytest

from search_spaces import Arch, Mask, param_count
from search_spaces.evolution_levels import default_level_generations, level_swap, movable_levels, mutate_levels
from search_spaces.mask_space import MaskSpace

ARCH = Arch(family="llama", num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=False)
SPACE = MaskSpace(ARCH, 0.2, widths=True, mlp_group=32, head_group=1)  # attn levels 0..2 units, MLP 0..128 by 32
GREEDY = Mask(attn_removed={0, 5, 6}, mlp_removed={3})  # every block at level 0 or full


def totals(mask: Mask) -> tuple[int, int]:
    """Groups kept per kind: what a swap conserves."""
    levels = SPACE.params(mask)
    return (sum(v for k, v in levels.items() if k.startswith("attn")),
            sum(v // 32 for k, v in levels.items() if k.startswith("mlp")))


def test_offspring_conserve_each_kinds_levels_and_move_only_by_norms():
    rng = random.Random(0)
    parent_removed = param_count(Mask(), ARCH) - param_count(GREEDY, ARCH)
    floor = parent_removed - 3 * ARCH.hidden_size
    narrowed = 0
    for _ in range(500):
        child = mutate_levels(GREEDY, SPACE, rng, max_swaps=3, min_removed=floor)
        assert child != GREEDY and SPACE.params(child) is not None  # on the grid
        assert totals(child) == totals(GREEDY)
        drift = param_count(GREEDY, ARCH) - param_count(child, ARCH)  # extra parameters removed
        assert drift % ARCH.hidden_size == 0 and -3 * ARCH.hidden_size <= drift <= 3 * ARCH.hidden_size
        assert param_count(Mask(), ARCH) - param_count(child, ARCH) >= floor
        narrowed += bool(child.head_units or child.mlp_width)
    assert narrowed > 400  # from a blocks-only parent, most offspring narrow a layer


def test_a_swap_between_partial_levels_is_exact():
    levels = SPACE.params(Mask(mlp_width={1: 64, 2: 96}))
    rng = random.Random(3)
    for _ in range(50):
        moved = level_swap(SPACE, levels, "mlp", rng)
        mask = SPACE.mask(moved)
        if all(0 < moved[f"mlp_{l}"] for l in range(8)):  # no block reached level 0
            assert param_count(mask, ARCH) == param_count(SPACE.mask(levels), ARCH)


def test_the_floor_is_never_crossed():
    """Floor at the parent's count: a swap that brings a removed block back (its norm too) is
    only taken together with one that removes another block."""
    parent_removed = param_count(Mask(), ARCH) - param_count(GREEDY, ARCH)
    rng = random.Random(1)
    for _ in range(200):
        child = mutate_levels(GREEDY, SPACE, rng, max_swaps=3, min_removed=parent_removed)
        assert param_count(child, ARCH) <= param_count(GREEDY, ARCH)


def test_nothing_to_move_and_off_grid_masks_are_named():
    rng = random.Random(2)
    assert movable_levels(SPACE, Mask()) == 0
    with pytest.raises(ValueError, match="nothing to move"):
        mutate_levels(Mask(), SPACE, rng, 3, 0)
    with pytest.raises(ValueError, match="not on the space's grid"):
        mutate_levels(Mask(mlp_width={1: 50}), SPACE, rng, 3, 0)
    assert movable_levels(SPACE, GREEDY) > 0


def test_the_same_seed_draws_the_same_offspring():
    first = [mutate_levels(GREEDY, SPACE, random.Random(7), 3, 0) for _ in range(3)]
    assert first == [mutate_levels(GREEDY, SPACE, random.Random(7), 3, 0) for _ in range(3)]


def test_default_generations_is_evopress_budget_on_levels():
    # attention: 3 of 8 blocks removed = 6 of 16 units; MLP: 1 of 8 = 4 of 32 groups
    assert default_level_generations(SPACE, GREEDY) == round((6 * 10 + 4 * 28) / 1.5)


def test_group_sizes_that_do_not_divide_are_named():
    space = MaskSpace(ARCH, 0.2, widths=True, mlp_group=48, head_group=1)
    assert any("search.mlp_group 48 does not divide the MLP width 128" in p for p in space.group_problems())
