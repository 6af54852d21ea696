"""Racing for greedy steps: round 1 on few windows, round 2 for the best; same path when round 1
ranks well, an audit that names every decision it changed when it does not."""

from __future__ import annotations

import math

import pytest

from orchestrator.search import BlockPrunerSearcher
from orchestrator.search.racing import RacingSearcher
from search_spaces import Mask
from tests.orchestrator.test_evolution import ARCH, trap

TARGET = 0.16


def drive(searcher, full, low):
    """Answer round-1 proposals (``fidelity`` set) with ``low``, the others with ``full``; returns
    the masks scored in each round."""
    rounds = {"low": [], "full": []}
    while (proposal := searcher.suggest()) is not None:
        score = low if proposal.fidelity else full
        rounds["low" if proposal.fidelity else "full"] += proposal.masks
        if searcher is not None and isinstance(searcher, RacingSearcher):
            assert proposal.levels == (searcher.windows,)
        searcher.observe({m: score(m) for m in proposal.masks})
    return rounds


def noisy(mask: Mask) -> float:
    """Round 1's estimate: the full score, off by a small amount that depends on the mask."""
    return trap(mask) * math.exp(0.002 * math.sin(7 * len(mask.to_json()) + sum(mask.attn_removed)))


def test_racing_takes_the_exact_path_and_scores_few_candidates_on_every_window():
    exact = BlockPrunerSearcher(ARCH, TARGET)
    exact_rounds = drive(exact, trap, trap)
    racing = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=4, keep=2, min_margin=0.001)
    rounds = drive(racing, trap, noisy)
    assert [s.to_dict() for s in racing.path] == [s.to_dict() for s in exact.path]
    assert racing.dense_ppl == exact.dense_ppl and racing.current == exact.current
    assert len(rounds["low"]) == len(exact_rounds["full"])  # every candidate once on few windows ...
    assert len(rounds["full"]) < len(exact_rounds["full"]) / 3  # ... and few on every window
    summary = racing.summary()["racing"]
    assert summary["candidates"] == len(rounds["low"]) and summary["finalists"] == len(rounds["full"])


def test_the_margin_follows_the_errors_of_round_one():
    racing = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=4, keep=2, min_margin=0.0)
    assert racing.margin() == 0.0
    drive(racing, trap, noisy)
    errors = [e for step in racing._errors for e in step]
    assert errors and racing.margin() > 0  # 3 x the spread of round 1's errors (centred per step)
    assert racing.margin() <= 3 * 2 * 0.002 + 1e-12


def test_the_audit_names_every_decision_racing_changed_and_what_it_cost():
    """Round 1 that hides the best candidate of step 1 (MLP 0 looks bad on few windows)."""

    def misleading(mask: Mask) -> float:
        return trap(mask) + (5.0 if 0 in mask.mlp_removed else 0.0)

    audited = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=4, keep=1, min_margin=0.0, audit=True)
    rounds = drive(audited, trap, misleading)
    exact = BlockPrunerSearcher(ARCH, TARGET)
    drive(exact, trap, trap)
    assert audited.path[0].mask != exact.path[0].mask  # racing chose otherwise at step 1 ...
    changed = [s for s in audited.steps if "changed" in s]
    assert changed and changed[0]["changed"]["exact"] == exact.path[0].mask.to_dict()
    assert changed[0]["changed"]["exact_ppl"] < changed[0]["changed"]["racing_ppl"]  # ... at this cost
    assert audited.summary()["racing"]["changed"] == len(changed)
    assert len(rounds["full"]) == len(rounds["low"])  # the audit scores every candidate on every window


def test_failed_candidates_and_bad_settings():
    def failing(mask: Mask) -> float:
        return math.nan if mask.attn_removed == {3} else trap(mask)

    racing = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=4, keep=2)
    drive(racing, failing, failing)
    assert all(math.isfinite(s.ppl) for s in racing.path)
    with pytest.raises(ValueError, match="racing needs windows >= 1"):
        RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=0)
    with pytest.raises(RuntimeError):
        RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=2).observe({})
