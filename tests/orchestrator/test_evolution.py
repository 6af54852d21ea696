"""Evolution on blocks: it escapes a trap greedy falls into, finds the brute-force optimum within a
stated budget, never leaves the greedy mask's parameter count, and replays after a stop."""

from __future__ import annotations

import itertools
import math

import pytest

from orchestrator.search.evolution import EvolutionSearcher
from search_spaces import Arch, Mask, param_count

ARCH = Arch(family="llama", num_layers=8, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=4,
            head_dim=16, vocab_size=100, tie_embeddings=False)
TARGET = 0.16  # three blocks: no two reach it, any three with an MLP do


def trap(mask: Mask) -> float:
    """A perplexity where greedy is wrong: MLP 0 costs least alone, but makes every other removal
    cost 1 more. Attention l costs 1 + l/10, MLP l 2 + l/10 (MLP 0: 0.5)."""
    cost = sum(1 + l / 10 for l in mask.attn_removed) + sum(2 + l / 10 if l else 0.5 for l in mask.mlp_removed)
    if 0 in mask.mlp_removed:
        cost += len(mask.attn_removed) + len(mask.mlp_removed) - 1
    return 10 + cost


def drive(searcher, score, stop_after: int | None = None) -> list[tuple[str, Mask]]:
    """Answer proposals with ``score``; returns every (label, mask) proposed. ``stop_after``: leave the
    search at that many proposals, the last one scored but never observed (a driver killed mid-generation)."""
    proposed: list[tuple[str, Mask]] = []
    while (proposal := searcher.suggest()) is not None:
        proposed += [(proposal.label, m) for m in proposal.masks]
        scores = {m: score(m) for m in proposal.masks}
        if stop_after == 0:
            break
        searcher.observe(scores)
        if stop_after is not None:
            stop_after -= 1
    return proposed


def offspring(proposed: list[tuple[str, Mask]]) -> list[Mask]:
    return [m for label, m in proposed if label.startswith("generation")]


def brute_force(like: Mask, score) -> tuple[Mask, float]:
    """The best mask with ``like``'s number of attention and MLP blocks removed."""
    best = None
    for attn in itertools.combinations(range(ARCH.num_layers), len(like.attn_removed)):
        for mlp in itertools.combinations(range(ARCH.num_layers), len(like.mlp_removed)):
            mask = Mask(attn_removed=set(attn), mlp_removed=set(mlp))
            if best is None or score(mask) < best[1]:
                best = (mask, score(mask))
    return best


def test_evolution_escapes_the_greedy_trap_and_finds_the_optimum_within_its_budget():
    searcher = EvolutionSearcher(ARCH, TARGET, offspring=8, generations=5, seed=0)
    proposed = drive(searcher, trap)
    greedy = searcher.greedy_mask
    assert greedy == Mask(attn_removed={0, 1}, mlp_removed={0})  # greedy took MLP 0 first: the trap
    optimum, best = brute_force(greedy, trap)
    assert optimum == Mask(attn_removed={0, 1}, mlp_removed={1}) and best < trap(greedy)
    # The budget: 5 generations of 8 offspring, at most 40 of the C(8,2) x C(8,1) = 224 masks with these counts.
    assert searcher.current == optimum and searcher.parent_ppl == best
    assert searcher.evaluations <= 40 and len(offspring(proposed)) <= 40
    assert searcher.path[-1].kind == "trial" and searcher.path[-1].mask == optimum
    assert searcher.references() == {"greedy": greedy}
    summary = searcher.summary()
    assert summary["greedy_ppl"] == trap(greedy) and summary["best_ppl"] == best
    assert [h["generation"] for h in summary["history"]] == list(range(1, summary["generations"] + 1))
    # Every offspring has the greedy mask's parameter count; none is proposed twice, nor one greedy scored.
    children, greedy_masks = offspring(proposed), {m for label, m in proposed if not label.startswith("generation")}
    assert children and len(set(children)) == len(children) and not set(children) & greedy_masks
    assert {param_count(m, ARCH) for m in children} == {param_count(greedy, ARCH)}


def test_nan_offspring_are_ranked_last_and_the_parent_survives_them():
    greedy = Mask(attn_removed={0, 1}, mlp_removed={0})

    def failing(mask: Mask) -> float:  # every 3-block mask but greedy's fails: every offspring is NaN
        blocks = len(mask.attn_removed) + len(mask.mlp_removed)
        return trap(mask) if blocks < 3 or mask == greedy else math.nan

    searcher = EvolutionSearcher(ARCH, TARGET, offspring=4, generations=5, seed=1)
    drive(searcher, failing)
    assert searcher.greedy_mask == searcher.current == greedy and searcher.parent_ppl == trap(greedy)
    assert searcher.generation == 5 and all(math.isnan(h["best_offspring_ppl"]) for h in searcher.history)


def test_a_stopped_search_replays_from_the_cache_to_the_same_result():
    """A driver stopped after scoring a generation it never observed: the new searcher, given what the
    cache holds, proposes no offspring that was scored and ends where an uninterrupted search ends (its
    greedy phase is proposed again, and a campaign's scorer answers it from the cache)."""
    reference = EvolutionSearcher(ARCH, TARGET, offspring=6, generations=12, seed=4)
    drive(reference, trap)

    first = EvolutionSearcher(ARCH, TARGET, offspring=6, generations=12, seed=4)
    cache: dict[Mask, float] = {}

    def scored(mask: Mask) -> float:
        cache[mask] = trap(mask)
        return cache[mask]

    drive(first, scored, stop_after=9)  # the greedy steps, then some generations; the last one lost
    assert first.generation < 12 and cache
    resumed = EvolutionSearcher(ARCH, TARGET, offspring=6, generations=12, seed=4, known=dict(cache))
    again = offspring(drive(resumed, trap))
    assert again and not set(again) & set(cache)  # no offspring scored twice
    assert resumed.current == reference.current and resumed.parent_ppl == reference.parent_ppl
    assert [s.to_dict() for s in resumed.path] == [s.to_dict() for s in reference.path]
    assert resumed.history == reference.history


def test_max_evaluations_stops_the_search():
    searcher = EvolutionSearcher(ARCH, TARGET, offspring=8, generations=100, seed=0, max_evaluations=20)
    drive(searcher, trap)
    assert searcher.evaluations == 20 and searcher.generation == 3  # 8 + 8 + 4


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="max_evaluations, first_windows and max_tokens must be >= 1"):
        EvolutionSearcher(ARCH, TARGET, offspring=0)
    with pytest.raises(ValueError, match="must be >= 1; got .* 0$"):
        EvolutionSearcher(ARCH, TARGET, max_tokens=0, calibration=(8, 100))


def test_auto_first_windows_is_evopress_share_of_the_campaign_windows():
    from orchestrator.config import SearchConfig
    from orchestrator.search import make_searcher

    search = SearchConfig(method="evolution", target_ratio=TARGET, batch_size=2)
    assert search.evolution.first_windows == "auto" and search.evolution.offspring == 32  # EvoPress's defaults
    assert make_searcher(search, ARCH, calibration=(256, 127)).first_windows == 4  # 1/64, whole batches
    assert make_searcher(search, ARCH, calibration=(2, 127)).first_windows is None  # one batch: one step
    assert make_searcher(search, ARCH).first_windows is None  # the windows unknown: one step on all of them


def test_a_token_budget_stops_the_search_and_replays_the_same():
    """Tokens count every offspring on the first windows and every survivor on the rest, cached or not:
    a replay against the cache stops at the same generation."""
    shape = (8, 100)  # 8 windows of 100 predicted tokens
    per_generation = 6 * 2 * 100 + 1 * 6 * 100  # 6 offspring on 2 windows, 1 survivor on the other 6
    budget = 3 * per_generation - 1  # three generations reach it
    search = EvolutionSearcher(ARCH, TARGET, offspring=6, generations=50, seed=4, first_windows=2, survivors=1,
                               max_tokens=budget, calibration=shape)
    proposed = drive(search, trap)
    assert search.generation == 3 and search.tokens == 3 * per_generation
    assert search.summary()["tokens"] == search.tokens and search.summary()["max_tokens"] == budget
    known = {m: trap(m) for m in offspring(proposed)}  # the cache: every offspring's full score
    replay = EvolutionSearcher(ARCH, TARGET, offspring=6, generations=50, seed=4, first_windows=2, survivors=1,
                               max_tokens=budget, calibration=shape, known=known)
    drive(replay, trap)
    assert replay.generation == 3 and replay.tokens == search.tokens and replay.history == search.history
    with pytest.raises(ValueError, match="max_tokens needs the calibration set's shape"):
        EvolutionSearcher(ARCH, TARGET, max_tokens=1000)
