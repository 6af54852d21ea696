"""One contract, every searcher (the way Optuna tests every sampler with one body).

The contract of :class:`orchestrator.search.base.Searcher`: ``suggest`` and ``observe`` alternate;
``observe`` gets a score for every mask of the proposal; after ``suggest`` returns None the search
is over and ``path`` is final; the searcher is deterministic given the scores. Here on top: the
path is consistent (numbered steps, the ratio and parameters of each step's mask, the score it was
told) and the search reaches the target.

SPRINT's ``observe`` also takes the actor's step result (``observe(scores, step=...)``): here that
result comes from :func:`sprint_step`, which derives sensitivities and refits from the same score
function in the shape ``Evaluator.sprint_step`` returns them.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import pytest

from orchestrator.config import IMPLEMENTED_METHODS, EvolutionConfig, RacingConfig, SearchConfig
from orchestrator.search import make_searcher
from search_spaces import Block, Mask, param_count, ratio
from search_spaces.latency import BlockCosts, best_candidate
from search_spaces.sprint import StepRequest, state_key, target_block, top_candidates
from tests.tiny import tiny_arch

TARGET = 0.3
SETTINGS = {
    "blockpruner": {},
    "multipruner": {"split": (0.4, 0.5, 0.1), "mlp_group": 16, "head_group": 1},
    "optuna": {"trials": 10, "batch": 3, "seed": 7},
    "optuna-nsga2": {"trials": 10, "batch": 3, "sampler": "nsga2", "warm_start": "none", "widths": True,
                     "mlp_group": 16},
    "sprint": {},
    "evolution": {"seed": 3, "evolution": EvolutionConfig(offspring=4, generations=6)},
    "evolution-widths": {"seed": 3, "widths": True, "mlp_group": 16,
                         "evolution": EvolutionConfig(offspring=4, generations=6, first_windows=2)},
    "blockpruner-racing": {"racing": RacingConfig(windows=2, keep=2)},
    "blockpruner-racing-rounds": {"racing": RacingConfig(windows=(1, 2, 4), keep=1)},
    "multipruner-racing": {"split": (0.4, 0.5, 0.1), "mlp_group": 16, "head_group": 1,
                           "racing": RacingConfig(windows=2, keep=1, audit=True)},
}
COSTS = BlockCosts(fixed=0.2, attn=0.1, mlp=0.25)  # SPRINT's latency table (seconds per block)
METHODS = ("blockpruner", "multipruner", "optuna", "optuna-nsga2", "sprint", "evolution", "evolution-widths",
           "blockpruner-racing", "blockpruner-racing-rounds", "multipruner-racing")


def test_every_implemented_method_is_in_the_contract():
    assert set(IMPLEMENTED_METHODS) <= {m.split("-")[0] for m in METHODS}


def build(name: str):
    method = name.split("-")[0]
    search = SearchConfig(method=method, target_ratio=TARGET, **SETTINGS[name])
    return make_searcher(search, tiny_arch("llama"), costs=COSTS)


def score(mask: Mask) -> float:
    """Deterministic perplexity: what goes matters, early blocks most; some masks fail (NaN)."""
    if mask.attn_removed >= {0, 1}:
        return math.nan
    return (10.0 + sum(3.0 / (1 + l) for l in mask.attn_removed) + sum(5.0 / (1 + l) for l in mask.mlp_removed)
            + sum(0.5 / w for _, w in mask.head_units) + sum(8.0 / w for _, w in mask.mlp_width))


def sprint_step(request: StepRequest) -> dict:
    """What ``Evaluator.sprint_step`` returns, derived from :func:`score`: a candidate's sensitivity
    is the score it adds; a refit of the MLP after it halves that (NaN stays NaN: it is data); one
    with no MLP after it scores inf; remembered scores come back as they went and join the choice."""
    L, base = tiny_arch("llama").num_layers, score(request.mask)
    sens = {b: score(request.mask.remove(Block.from_index(b))) - base for b in request.candidates}
    ranked = {**dict(request.known), **sens}
    top = top_candidates(ranked, request.costs, request.top_k)
    remembered = dict(request.remembered)
    tuned = []
    for b in [*top, *sorted(set(remembered) - set(top))]:
        target = target_block(request.mask, L, b)
        refit = target % 2 == 1 and target > b and not request.mask.removed(Block.from_index(target))
        if b in remembered:
            tuned.append({"block": b, "target": target, "sensitivity": remembered[b], "untuned": ranked[b],
                          "status": "remembered"})
            continue
        tuned.append({"block": b, "target": target, "sensitivity": ranked[b] / 2 if refit else math.inf,
                      "untuned": ranked[b], "status": "ok" if refit else "no-mlp"})
    best = best_candidate({t["block"]: t["sensitivity"] for t in tuned}, request.costs)
    choice = next(t for t in tuned if t["block"] == best)
    if choice["status"] == "remembered":  # its refit again
        choice = {**choice, "status": "ok"}
    sha = hashlib.sha256(f"{request.mask.to_json()}|{best}".encode()).hexdigest() if choice["status"] == "ok" else None
    return {"state": state_key(request.mask, request.tuned), "sensitivity": sens, "top": top, "tuned": tuned,
            "choice": {**choice, "sha": sha}}


def drive(searcher) -> list[tuple[tuple[Mask, ...], Mask | None, str]]:
    proposals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failed (NaN) trials warn
        while (p := searcher.suggest()) is not None:
            assert p.masks and all(isinstance(m, Mask) for m in p.masks)
            proposals.append((p.masks, p.base, p.label))
            scores = {m: score(m) for m in p.masks}
            request = getattr(p, "request", None)  # SPRINT: the step an actor runs
            if request is None:
                searcher.observe(scores)
            else:
                searcher.observe(scores, step=sprint_step(request) if request.top_k else None)
            assert len(proposals) < 1000, "the search does not end"
    return proposals


@pytest.fixture(params=METHODS)
def method(request) -> str:
    return request.param


def test_observe_needs_a_pending_suggest_and_every_mask(method):
    searcher = build(method)
    with pytest.raises(RuntimeError):
        searcher.observe({})
    proposal = searcher.suggest()
    assert proposal is not None
    with pytest.raises(KeyError):
        searcher.observe({m: score(m) for m in proposal.masks[1:]})


def test_after_none_the_path_is_final(method):
    searcher = build(method)
    drive(searcher)
    path, current = list(searcher.path), searcher.current
    assert path, "a finished search has a path"
    for _ in range(3):
        assert searcher.suggest() is None
    assert searcher.path == path and searcher.current == current


def test_deterministic_given_the_scores(method):
    first, second = build(method), build(method)
    assert drive(first) == drive(second)
    assert [s.to_dict() for s in first.path] == [s.to_dict() for s in second.path]


def test_path_is_consistent_and_reaches_the_target(method):
    searcher = build(method)
    drive(searcher)
    arch = tiny_arch("llama")
    assert searcher.dense_ppl == score(Mask())
    assert [s.step for s in searcher.path] == list(range(1, len(searcher.path) + 1))
    for s in searcher.path:
        assert s.ratio == pytest.approx(ratio(s.mask, arch)) and s.params == param_count(s.mask, arch)
        assert s.ppl == score(s.mask) and math.isfinite(s.ppl)
    assert searcher.current == searcher.path[-1].mask
    assert searcher.path[-1].ratio >= TARGET - 1e-12
