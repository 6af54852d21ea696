"""EvoPress's mutation: exact parameter counts, real changes, the swap-count distribution, the budget."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from search_spaces import Arch, Mask, param_count
from search_spaces.evolution import default_first_windows, default_generations, mutate, swap, swappable

ARCH = Arch(family="llama", num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=False)
PARENT = Mask(attn_removed={0, 5, 6}, mlp_removed={3})


def test_every_offspring_keeps_the_parameter_count_and_the_kinds_exactly():
    rng = random.Random(0)
    for _ in range(500):
        child = mutate(PARENT, ARCH.num_layers, rng)
        assert child != PARENT
        assert param_count(child, ARCH) == param_count(PARENT, ARCH)
        assert (len(child.attn_removed), len(child.mlp_removed)) == (3, 1)
        assert child.attn_removed <= set(range(8)) and child.mlp_removed <= set(range(8))


def test_swaps_per_mutation_follow_min_of_two_uniforms():
    """min(U[1,3], U[1,3]): 1 swap with probability 5/9, 2 with 3/9, 3 with 1/9. A mutation's
    distance to its parent (blocks restored) is at most its swaps, and equal to them unless a swap
    undoes another: rare among 32 removed of 64 blocks per kind."""
    rng = random.Random(1)
    parent = Mask(attn_removed=set(range(0, 64, 2)), mlp_removed=set(range(1, 64, 2)))
    distances = Counter(len(parent.attn_removed - c.attn_removed) + len(parent.mlp_removed - c.mlp_removed)
                        for c in (mutate(parent, 64, rng) for _ in range(9000)))
    assert set(distances) <= {1, 2, 3}
    assert distances[1] / 9000 == pytest.approx(5 / 9, abs=0.05)
    assert distances[3] / 9000 == pytest.approx(1 / 9, abs=0.03)


def test_a_kind_fully_kept_or_fully_removed_is_never_swapped():
    only_attn = Mask(attn_removed={1, 2})  # no MLP removed: swaps are attention swaps
    rng = random.Random(2)
    assert swappable(only_attn, 8) == ["attn"]
    assert all(not mutate(only_attn, 8, rng).mlp_removed for _ in range(100))
    with pytest.raises(ValueError, match="nothing to swap"):
        mutate(Mask(), 8, rng)
    with pytest.raises(ValueError, match="no mlp block to swap"):
        swap(only_attn, 8, "mlp", rng)
    with pytest.raises(ValueError, match="without widths"):
        mutate(Mask(attn_removed={1}, mlp_width={2: 64}), 8, rng)


def test_the_same_seed_draws_the_same_offspring():
    first = [mutate(PARENT, 8, random.Random(7)) for _ in range(3)]
    assert first == [mutate(PARENT, 8, random.Random(7)) for _ in range(3)]


def test_default_generations_is_evopress_budget():
    assert default_generations(PARENT, 8) == round((3 * 5 + 1 * 7) / 1.5)
    assert default_generations(Mask(attn_removed={0}), 8) == round(7 / 1.5)


@pytest.mark.parametrize("windows, batch, first", [
    (32, 1, 1),  # EvoPress's own set, 32 x 4096 tokens: 2,048 tokens round up to one window
    (64, 1, 1), (128, 1, 2), (640, 1, 10), (641, 1, 11),  # 1/64 of the windows, rounded up
    (128, 4, 4), (32, 2, 2),  # at least one whole batch, as the scorer cuts its levels
    (2, 2, None), (1, 1, None), (4, 4, None),  # one batch is the whole set: one step on every window
])
def test_the_first_selection_step_is_evopress_share_of_the_windows(windows, batch, first):
    assert default_first_windows(windows, batch) == first


def test_the_first_selection_step_needs_windows():
    with pytest.raises(ValueError, match="n_windows >= 1"):
        default_first_windows(0)
