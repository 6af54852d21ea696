"""Fidelity levels: scores on a prefix of the calibration windows, cached segment by segment.

A score on the first 4 windows and later on all 12 forwards each window once, never stands for the
other, and adds up to the score on all windows exactly; a cache with segments replays without a
forward pass. The evolution searcher's two-step selection on top of it.
"""

from __future__ import annotations

import math

import pytest

from orchestrator.cache import EvalCache
from orchestrator.search.evolution import EvolutionSearcher
from search_spaces import Block, Mask, perplexity
from tests.orchestrator.test_evolution import ARCH as EVO_ARCH, TARGET, drive, trap
from tests.orchestrator.test_window_shards import TOKENS, FakePool, fake_scorer, window_nll

MASKS = [Mask().remove(Block(1, "mlp")), Mask().remove(Block(2, "attn")), Mask(attn_removed={0}, mlp_removed={3})]


def exact(mask: Mask, stop: int) -> float:
    """The perplexity of ``mask`` on windows [0, stop) of the fake pool, from first principles."""
    return perplexity(math.fsum(window_nll(mask.to_json(), i) for i in range(stop)), stop * TOKENS)


def forwarded(pool: FakePool) -> list[tuple[str, int]]:
    """Every (mask, window) the pool scored."""
    out = []
    for task in pool.tasks:
        start, stop = task.rows or (0, pool.windows)
        out += [(m, i) for m in task.masks for i in range(start, stop)]
    return out


def test_a_prefix_then_all_windows_forwards_each_window_once_and_adds_up(tmp_path):
    pool = FakePool(2, windows=12)
    scorer = fake_scorer(tmp_path, pool)  # batches of 2
    low = scorer.score_upto(MASKS, Mask(), "calibration", 4, (4,), "low")
    assert low == {m: pytest.approx(exact(m, 4), rel=1e-12) for m in MASKS}
    assert sorted({i for _, i in forwarded(pool)}) == [0, 1, 2, 3]  # nothing beyond the prefix
    full = scorer.score_upto(MASKS, Mask(), "calibration", None, (4,), "full")
    assert full == {m: pytest.approx(exact(m, 12), rel=1e-12) for m in MASKS}
    windows = forwarded(pool)
    assert len(windows) == len(set(windows)) == len(MASKS) * 12  # every window of every mask exactly once
    # A batch-aligned cut: a prefix of 3 windows is the level of 4 (batches stay whole).
    assert scorer.score_upto(MASKS[:1], Mask(), "calibration", 3, (4,), "again")[MASKS[0]] == low[MASKS[0]]
    assert len(forwarded(pool)) == len(windows)


def test_racing_rounds_on_growing_prefixes_forward_each_window_once(tmp_path):
    """Racing with windows=(2, 4, 8): a shrinking field on each longer prefix, then all windows."""
    pool = FakePool(2, windows=12)
    scorer = fake_scorer(tmp_path, pool)
    cuts, field = (2, 4, 8), list(MASKS)
    for upto in (*cuts, None):
        scores = scorer.score_upto(field, Mask(), "calibration", upto, cuts, f"round {upto}")
        assert scores == {m: pytest.approx(exact(m, upto or 12), rel=1e-12) for m in field}
        field = field[:-1] or field  # one fewer each round
    windows = forwarded(pool)
    assert len(windows) == len(set(windows))  # no (mask, window) twice
    # Each round re-reads the windows of the rounds before it from the cache: answered, not counted again.
    assert scorer.counters.tokens_by_set == {"calibration": len(windows) * TOKENS}
    assert scorer.counters.tokens_cached == 0 and scorer.counters.cached > 0
    assert sorted(i for m, i in windows if m == MASKS[0].to_json()) == list(range(12))
    assert max(i for m, i in windows if m == MASKS[2].to_json()) == 1  # cut after round 1: windows 0 and 1 only


def test_segments_never_stand_for_each_other_or_for_the_whole_set(tmp_path):
    pool = FakePool(1, windows=12)
    scorer = fake_scorer(tmp_path, pool)
    scorer.score_upto(MASKS[:1], None, "calibration", 4, (4,), "low")
    fingerprints = {r["calibration_fp"] for r in scorer.cache.rows()}
    assert len(fingerprints) == 1 and "w" not in fingerprints  # the segment's own, not the set's
    assert scorer.known("calibration") == {}  # a score on 4 windows is not a score on 12
    before = len(forwarded(pool))
    whole = scorer.score(MASKS[:1], None, "calibration", "whole")  # the set's own key: forwarded
    assert len(forwarded(pool)) == before + 12 and whole[MASKS[0]] == pytest.approx(exact(MASKS[0], 12), rel=1e-12)
    other = scorer.score_upto(MASKS[:1], None, "calibration", 6, (6,), "other cut")  # another level: [0, 6)
    assert other[MASKS[0]] == pytest.approx(exact(MASKS[0], 6), rel=1e-12)
    assert scorer.segment("calibration", 0, 4) != scorer.segment("calibration", 0, 6)
    with pytest.raises(ValueError, match="not a range"):
        scorer.segment("calibration", 4, 13)


def test_a_cache_of_segments_replays_without_a_forward(tmp_path):
    first = fake_scorer(tmp_path, FakePool(2, windows=12))
    scores = first.score_upto(MASKS, Mask(), "calibration", None, (4,), "full")
    first.cache.flush()
    replay_pool = FakePool(2, windows=12)
    replay = fake_scorer(tmp_path, replay_pool)
    assert replay.score_upto(MASKS, Mask(), "calibration", None, (4,), "full") == scores
    assert replay_pool.tasks == []


def test_a_score_on_the_whole_set_answers_every_window_without_a_forward(tmp_path):
    """An exact search's rows (a greedy run to the same ratio, a warm start) serve racing's and
    evolution's last round: a mask scored on all windows is not forwarded again segment by segment,
    while a prefix still needs its own segment."""
    pool = FakePool(2, windows=12)
    scorer = fake_scorer(tmp_path, pool)
    whole = scorer.score(MASKS[:2], Mask(), "calibration", "exact")
    before = len(forwarded(pool))
    full = scorer.score_upto(MASKS, Mask(), "calibration", None, (4,), "last round")
    assert full == {m: pytest.approx(exact(m, 12), rel=1e-12) for m in MASKS}
    assert {m: full[m] for m in MASKS[:2]} == whole  # the whole-set rows themselves
    new = forwarded(pool)[before:]
    assert {m for m, _ in new} == {MASKS[2].to_json()} and len(new) == 12  # only the mask without a row
    assert scorer.counters.tokens_by_set == {"calibration": len(MASKS) * 12 * TOKENS}  # each row once
    low = scorer.score_upto(MASKS[:1], Mask(), "calibration", 4, (4,), "first round")  # a prefix: forwarded
    assert low[MASKS[0]] == pytest.approx(exact(MASKS[0], 4), rel=1e-12)
    assert forwarded(pool)[before + 12:] == [(MASKS[0].to_json(), i) for i in range(4)]


def test_a_failed_segment_fails_the_score(tmp_path):
    mask = MASKS[0]
    pool = FakePool(2, windows=12, fail=frozenset({(mask.to_json(), (4, 6))}))  # a shard of the second segment
    scorer = fake_scorer(tmp_path, pool)
    assert scorer.score_upto([mask], Mask(), "calibration", 4, (4,), "low")[mask] == pytest.approx(exact(mask, 4))
    assert math.isnan(scorer.score_upto([mask], Mask(), "calibration", None, (4,), "full")[mask])


# ---- EvoPress's two-step selection ---------------------------------------------------------------
def test_two_step_selection_scores_only_the_survivors_on_every_window():
    fidelities: list[tuple[int | None, int]] = []

    def drive_logging(searcher):
        while (proposal := searcher.suggest()) is not None:
            if proposal.label.startswith("generation"):
                fidelities.append((proposal.fidelity, len(proposal.masks)))
                assert proposal.levels == (4,)
            searcher.observe({m: trap(m) + (0.01 if proposal.fidelity else 0.0) for m in proposal.masks})

    searcher = EvolutionSearcher(EVO_ARCH, TARGET, offspring=8, generations=30, seed=0, first_windows=4, survivors=2)
    drive_logging(searcher)
    assert {f for f, _ in fidelities} == {4, None}
    assert all(n <= 2 for f, n in fidelities if f is None) and any(n > 2 for f, n in fidelities if f == 4)
    # The low-fidelity score ranks like the full one here, so the optimum is found all the same.
    exact_search = EvolutionSearcher(EVO_ARCH, TARGET, offspring=8, generations=30, seed=0)
    drive(exact_search, trap)
    assert searcher.current == exact_search.current == Mask(attn_removed={0, 1}, mlp_removed={1})
    assert searcher.summary()["first_windows"] == 4 and searcher.summary()["survivors"] == 2
