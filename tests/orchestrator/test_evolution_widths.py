"""Evolution with widths: from the greedy mask (whole blocks), level swaps spread the removal over
layers and reach the brute-force optimum of a separable quadratic perplexity within a stated budget."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.search.evolution import EvolutionSearcher
from search_spaces import Arch, Mask, param_count

from .test_evolution import drive, offspring

ARCH = Arch(family="llama", num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=False)  # 2 head units (KV groups) per layer, MLP 128
ATTN, MLP = (3.0, 1.0, 2.0, 4.0), (6.0, 2.5, 3.0, 8.0)  # what each layer's block is worth


def quadratic(mask: Mask) -> float:
    """Losing a fraction f of a block costs weight x f^2: narrowing many layers beats removing one."""
    return 10.0 + sum(ATTN[l] * (1 - mask.heads_kept(l, 2) / 2) ** 2 + MLP[l] * (1 - mask.mlp_kept(l, 128) / 128) ** 2
                      for l in range(ARCH.num_layers))


def searcher(seed: int, generations: int, **kwargs) -> EvolutionSearcher:
    return EvolutionSearcher(ARCH, 0.2, offspring=8, generations=generations, seed=seed, widths=True, mlp_group=32,
                             head_group=1, **kwargs)


def brute_force(search: EvolutionSearcher) -> tuple[Mask, float, int]:
    """The best mask with the greedy mask's groups per kind and at least ``min_removed`` parameters
    removed (the masks evolution may visit), and how many there are."""
    space, greedy = search.space, search.space.params(search.greedy_mask)

    def total(levels, kind):
        return sum(v for name, v in levels.items() if name.startswith(kind))

    best, count = None, 0
    for attn in itertools.product((0, 1, 2), repeat=4):
        for mlp in itertools.product(range(0, 129, 32), repeat=4):
            levels = {**{f"attn_{l}": attn[l] for l in range(4)}, **{f"mlp_{l}": mlp[l] for l in range(4)}}
            if (total(levels, "attn"), total(levels, "mlp")) != (total(greedy, "attn"), total(greedy, "mlp")):
                continue
            if space.removal(levels) < search.min_removed:
                continue
            count += 1
            mask = space.mask(levels)
            if best is None or quadratic(mask) < best[1]:
                best = (mask, quadratic(mask))
    return (*best, count)


@pytest.mark.parametrize("seed", range(5))
def test_widths_evolution_finds_the_optimum_within_ten_generations(seed):
    search = searcher(seed, generations=10)
    proposed = drive(search, quadratic)
    greedy = search.greedy_mask
    assert greedy == Mask(attn_removed={1, 2}, mlp_removed={1})  # whole blocks: 15.5
    optimum, best, count = brute_force(search)
    assert count == 665 and best < quadratic(greedy) - 2  # narrowing wins by a lot
    # The budget: 10 generations of 8 offspring, at most 80 evaluations of the 665 masks.
    assert search.current == optimum and search.parent_ppl == best and search.evaluations <= 80
    children = offspring(proposed)
    assert children and any(c.head_units or c.mlp_width for c in children)
    dense = param_count(Mask(), ARCH)
    assert all(dense - param_count(c, ARCH) >= search.min_removed for c in children)
    assert search.min_removed >= 0.2 * dense  # the floor never lets the ratio fall under the target
    assert search.summary()["widths"] is True


def test_a_stopped_widths_search_replays_to_the_same_result():
    reference = searcher(2, generations=8)
    drive(reference, quadratic)
    cache: dict[Mask, float] = {}

    def scored(mask: Mask) -> float:
        cache[mask] = quadratic(mask)
        return cache[mask]

    drive(searcher(2, generations=8), scored, stop_after=7)
    resumed = searcher(2, generations=8, known=dict(cache))
    again = offspring(drive(resumed, quadratic))
    assert again and not set(again) & set(cache)
    assert resumed.current == reference.current and resumed.history == reference.history


def test_group_sizes_that_do_not_divide_are_refused_before_any_work():
    with pytest.raises(ValueError, match="search.mlp_group 48 does not divide the MLP width 128"):
        EvolutionSearcher(ARCH, 0.2, widths=True, mlp_group=48)
