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
    with pytest.raises(ValueError, match="probes >= 0"):
        RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=2, probes=-1)
    with pytest.raises(RuntimeError):
        RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=2).observe({})


FULL = 32  # calibration windows of the rounds test
DEEP = 0.5  # ten steps: enough for every round's error spread to be measured


def by_windows(mask: Mask, windows: int | None) -> float:
    """A score on the first ``windows`` windows: the full score off by a mask-dependent amount that
    shrinks as the windows grow (the error of a mean over fewer windows), none on every window."""
    if windows is None or windows >= FULL:
        return trap(mask)
    scale = 0.02 * math.sqrt(1 / windows - 1 / FULL)
    return trap(mask) * math.exp(scale * math.sin(7 * len(mask.to_json()) + 3 * sum(mask.attn_removed)))


def test_rounds_on_more_windows_cut_the_field_and_forward_each_window_once():
    exact = BlockPrunerSearcher(ARCH, DEEP)
    exact_rounds = drive(exact, trap, trap)
    rounds = RacingSearcher(BlockPrunerSearcher(ARCH, DEEP), windows=(2, 4, 8, 16), keep=2, min_margin=0.001,
                            probes=0)
    forwarded = one = 0  # window-candidates computed: every candidate reads a round's earlier windows from cache
    seen: dict[Mask, int] = {}  # windows a candidate has been scored on so far this step
    while (proposal := rounds.suggest()) is not None:
        assert proposal.levels == (2, 4, 8, 16)
        windows = proposal.fidelity or FULL
        if proposal.fidelity == 2:
            seen, one = {}, one + len(proposal.masks)
        assert all(seen.get(m, 0) < windows for m in proposal.masks)  # never the same fidelity twice
        assert set(proposal.masks) <= set(seen) or proposal.fidelity == 2  # later rounds: entrants of the last
        forwarded += sum(windows - seen.get(m, 0) for m in proposal.masks)
        seen.update({m: windows for m in proposal.masks})
        rounds.observe({m: by_windows(m, proposal.fidelity) for m in proposal.masks})
    assert [s.to_dict() for s in rounds.path] == [s.to_dict() for s in exact.path]
    assert one == len(exact_rounds["full"])  # every candidate once on the first round ...
    assert forwarded < FULL * one / 3  # ... and a third of the exact steps' windows in all
    assert all(s["rounds"] == sorted(s["rounds"], reverse=True) for s in rounds.steps)  # the field only shrinks
    assert max(len(s["rounds"]) for s in rounds.steps) == 4  # some steps needed every round
    margins = [rounds.margin(r) for r in range(4)]
    assert margins == sorted(margins, reverse=True) and margins[3] < margins[0] / 2  # more windows: narrower cuts


def looks_second_best(mask: Mask, windows: int | None = None) -> float:
    """A score on few windows where step 1's best candidate (MLP 0: 10.5 on all windows) ranks
    second (11.05), just behind attention 0 (11.0): a cut at keep=1 with no margin loses it."""
    return trap(mask) + (0.55 if windows and 0 in mask.mlp_removed else 0.0)


@pytest.mark.parametrize("windows", [4, (2, 4)])
def test_a_probe_rescues_the_best_candidate_a_cut_would_lose(windows):
    def race(probes):
        racing = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=windows, keep=1, min_margin=0.0,
                                probes=probes)
        finals = []
        while (proposal := racing.suggest()) is not None:
            if proposal.fidelity is None:
                finals.append(set(proposal.masks))
            racing.observe({m: looks_second_best(m, proposal.fidelity) for m in proposal.masks})
        return racing, finals

    exact = BlockPrunerSearcher(ARCH, TARGET)
    drive(exact, trap, trap)
    blind, _ = race(0)
    assert blind.path[0].mask != exact.path[0].mask  # without a probe the cut loses MLP 0 ...
    probed, finals = race(1)
    assert probed.path[0].mask == exact.path[0].mask == Mask(mlp_removed={0})  # ... the probe brings it back,
    assert Mask(mlp_removed={0}) in finals[0]  # past the later cut that would lose it again (rounds (2, 4))
    summary = probed.summary()["racing"]
    assert summary["probes"] == 1 and summary["probe_won"] >= 1 and probed.steps[0]["probe_won"]
    assert all(s["probes"] <= len(s["rounds"]) for s in probed.steps)  # at most one probe per cut


def test_probes_widen_the_margin_they_measure():
    """Finalists are the candidates round 1 scored luckily; a probe's error adds the other side."""
    margins = {}
    for probes in (0, 1):
        racing = RacingSearcher(BlockPrunerSearcher(ARCH, DEEP), windows=4, keep=2, min_margin=0.0, probes=probes)
        while (proposal := racing.suggest()) is not None:
            racing.observe({m: by_windows(m, proposal.fidelity) for m in proposal.masks})
        margins[probes] = racing.margin()
    assert margins[1] > margins[0] > 0


def test_a_round_that_could_cut_no_one_is_skipped():
    racing = RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=(2, 4, 8), keep=100)
    fidelities = []
    while (proposal := racing.suggest()) is not None:
        fidelities.append(proposal.fidelity)
        racing.observe({m: by_windows(m, proposal.fidelity) for m in proposal.masks})
    assert set(fidelities) == {2, None}  # everyone makes the cut of round 1: straight to every window
    assert all(s["rounds"] == [s["candidates"]] for s in racing.steps)


@pytest.mark.parametrize("windows", [(4, 4), (8, 4), (), (0, 2)])
def test_rounds_must_grow(windows):
    with pytest.raises(ValueError, match="increasing window counts"):
        RacingSearcher(BlockPrunerSearcher(ARCH, TARGET), windows=windows)


def test_a_race_stopped_mid_step_replays_from_the_cache_to_the_same_path():
    """A driver killed mid-step: the rerun's racer asks again what the first asked, in the same order
    (probes included), every answer comes from the cache, and the path is the uninterrupted one's."""

    def run(cache, stop_after=None):
        racing = RacingSearcher(BlockPrunerSearcher(ARCH, DEEP), windows=(2, 4, 8), keep=2, min_margin=0.001)
        computed = proposals = 0
        while (proposal := racing.suggest()) is not None:
            scores = {}
            for m in proposal.masks:
                if (m, proposal.fidelity) not in cache:
                    cache[m, proposal.fidelity], computed = by_windows(m, proposal.fidelity), computed + 1
                scores[m] = cache[m, proposal.fidelity]
            proposals += 1
            if proposals == stop_after:
                return racing, computed  # scored and cached, never observed
            racing.observe(scores)
        return racing, computed

    whole, computed = run({})
    assert sum(s["probes"] for s in whole.steps) > 0
    for stop_after in (3, 7, 12):
        cache: dict = {}
        _, before = run(cache, stop_after)
        again, after = run(cache)
        assert [s.to_dict() for s in again.path] == [s.to_dict() for s in whole.path]
        assert before + after == computed  # nothing scored twice, nothing more than the uninterrupted run
        assert again.steps == whole.steps
