"""The Optuna searcher in-process (no Ray): band, warm starts, failed trials, resume from the journal."""

from __future__ import annotations

import math

import pytest

from orchestrator.search.optuna_search import FailedTrialWarning, OptunaSearcher
from search_spaces import Arch, Mask, ratio
from tests.tiny import tiny_arch

SMOL = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)


def fake_ppl(mask: Mask) -> float:
    """Deterministic: early blocks matter more, narrowing costs a little."""
    return (20.0 + sum(5.0 / (1 + l) for l in mask.attn_removed) + sum(12.0 / (1 + l) for l in mask.mlp_removed)
            + 0.01 * len(mask.head_units) + 0.02 * len(mask.mlp_width))


def drive(searcher, score=fake_ppl, limit: int | None = None) -> list[tuple[str, tuple[Mask, ...]]]:
    """Run to the end (or ``limit`` proposals); return (label, masks) of every proposal."""
    seen = []
    while (limit is None or len(seen) < limit) and (p := searcher.suggest()) is not None:
        seen.append((p.label, p.masks))
        searcher.observe({m: score(m) for m in p.masks})
    return seen


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
@pytest.mark.parametrize("widths", [False, True])
def test_never_proposes_a_mask_outside_the_band_nor_twice(sampler, widths):
    searcher = OptunaSearcher(SMOL, 0.1, trials=40, batch=4, sampler=sampler, widths=widths, mlp_group=256,
                              warm_start="none", seed=3)
    proposals = drive(searcher)
    trial_masks = [m for _, masks in proposals for m in masks if m != Mask()]
    assert len(trial_masks) == len(set(trial_masks)) == 40
    low, high = searcher.space.band
    assert all(low <= ratio(m, SMOL) <= high + 1e-12 for m in trial_masks)
    assert widths == any(m.mlp_width or m.head_units for m in trial_masks)
    assert all(len(masks) <= 4 + 1 for _, masks in proposals)  # a batch (+ the dense model, once)
    summary = searcher.summary()
    assert summary["counts"]["sampler"] == 40 and summary["improved"] is None
    assert searcher.path[-1].kind == "trial" and searcher.current == Mask.from_dict(summary["best"]["mask"])
    assert searcher.dense_ppl == fake_ppl(Mask())


def test_greedy_warm_start_is_the_first_trial_and_never_beaten_by_worse():
    arch = tiny_arch("llama")
    known = {Mask({0, 1}): 99.0, Mask({3}, {3}): 21.0}  # the cache: the second lies in the band
    searcher = OptunaSearcher(arch, 0.3, trials=12, batch=3, known=known, seed=1)
    proposals = drive(searcher)
    greedy = [p for p in proposals if p[0].startswith("blockpruner")]
    assert greedy and proposals[: len(greedy)] == greedy  # BlockPruner first, then the study
    summary = searcher.summary()
    first = summary["blockpruner"]
    assert first is not None and summary["points"][first["trial"]]["origin"] == "blockpruner"
    origins = [p["origin"] for p in summary["points"]]
    assert origins.index("blockpruner") == origins.count("cache")  # seeds first, then the greedy mask
    assert summary["best"]["ppl"] <= first["ppl"]
    assert summary["improved"] == (summary["best"]["ppl"] < first["ppl"])
    greedy_steps = [s for s in searcher.path if s.kind != "trial"]
    assert greedy_steps and greedy_steps[-1].mask == Mask.from_dict(first["mask"])
    assert (searcher.path[-1].kind == "trial") == summary["improved"]
    assert searcher.current == Mask.from_dict(summary["best"]["mask"])
    assert searcher.references() == {"blockpruner": greedy_steps[-1].mask}
    # Nothing in the cache or already scored is ever proposed again.
    study_masks = [m for label, masks in proposals if label.startswith("optuna") for m in masks]
    assert Mask({3}, {3}) not in study_masks
    assert not set(study_masks) & {m for label, masks in greedy for m in masks}


def test_nan_is_a_failed_trial_with_a_warning():
    arch = tiny_arch("qwen2")
    searcher = OptunaSearcher(arch, 0.3, trials=10, batch=5, warm_start="none")

    def score(mask):
        return math.nan if 0 in mask.mlp_removed else fake_ppl(mask)

    with pytest.warns(FailedTrialWarning, match="failed trial"):
        drive(searcher, score)
    summary = searcher.summary()
    assert summary["counts"].get("failed", 0) >= 1
    assert 0 not in Mask.from_dict(summary["best"]["mask"]).mlp_removed


def test_observe_needs_every_mask_and_a_pending_proposal():
    searcher = OptunaSearcher(tiny_arch("llama"), 0.3, trials=4, batch=2, warm_start="none")
    with pytest.raises(RuntimeError, match="without a pending suggest"):
        searcher.observe({})
    proposal = searcher.suggest()
    with pytest.raises(RuntimeError, match="suggest\\(\\) called twice"):
        searcher.suggest()
    with pytest.raises(KeyError, match="no score for 1 proposed mask"):
        searcher.observe({m: 1.0 for m in proposal.masks[1:]})
    searcher.observe({m: fake_ppl(m) for m in proposal.masks})


def test_resumes_from_the_journal_after_a_stop(tmp_path):
    journal = tmp_path / "optuna.journal"
    settings = dict(trials=16, batch=4, warm_start="none", storage=journal, seed=5)
    first = OptunaSearcher(SMOL, 0.1, **settings)
    scored: dict[Mask, float] = {}
    for _ in range(2):
        p = first.suggest()
        scored.update({m: fake_ppl(m) for m in p.masks})
        first.observe({m: fake_ppl(m) for m in p.masks})
    stopped = first.suggest()  # asked, never told: the campaign was stopped here
    running = set(stopped.masks)
    assert journal.is_file()

    # The cache holds what was evaluated; the stopped batch is half evaluated.
    half = dict(list({m: fake_ppl(m) for m in stopped.masks}.items())[:2])
    second = OptunaSearcher(SMOL, 0.1, known={**scored, **half}, **settings)
    assert second.study_name == first.study_name
    resumed = drive(second)
    proposed = [m for _, masks in resumed for m in masks]
    assert set(proposed[:2]) == running - set(half)  # the untold trials come first
    assert not set(proposed) & set(scored)  # nothing already scored is proposed again
    summary = second.summary()
    assert summary["counts"]["sampler"] == 16 and "RUNNING" not in {p["state"] for p in summary["points"]}
    assert len({p["trial"] for p in summary["points"]}) == len(summary["points"])

    # A third run on a finished study proposes nothing new.
    third = OptunaSearcher(SMOL, 0.1, known={**scored, **{m: fake_ppl(m) for m in proposed}}, **settings)
    assert [m for _, masks in drive(third) for m in masks] == []
    assert third.summary()["best"] == summary["best"]


def test_after_the_warm_start_no_trial_removes_less_than_greedy():
    """The band moves up to the greedy mask's ratio (same width): a better trial is never better for
    removing less."""
    searcher = OptunaSearcher(SMOL, 0.1, trials=30, batch=4, seed=2)
    proposals = drive(searcher)
    greedy = ratio(searcher.references()["blockpruner"], SMOL)
    assert greedy > 0.1  # BlockPruner ends past the target: the floor moved
    study = [m for label, masks in proposals if label.startswith("optuna") for m in masks if m != Mask()]
    assert len(study) == 30 and all(ratio(m, SMOL) >= greedy - 1e-9 for m in study)
    low, high = searcher.summary()["band"]
    assert low == pytest.approx(greedy) and high - low == pytest.approx(searcher.space.tolerance)
    # The warm start's first step scored every single removal: the repair's prior.
    prior = searcher._study.sampler.prior
    assert len(prior) == 60 and prior["attn_0"] == fake_ppl(Mask(attn_removed={0}))
