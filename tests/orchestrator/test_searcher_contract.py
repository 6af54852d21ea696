"""One contract, every searcher (the way Optuna tests every sampler with one body).

The contract of :class:`orchestrator.search.base.Searcher`: ``suggest`` and ``observe`` alternate;
``observe`` gets a score for every mask of the proposal; after ``suggest`` returns None the search
is over and ``path`` is final; the searcher is deterministic given the scores. Here on top: the
path is consistent (numbered steps, the ratio and parameters of each step's mask, the score it was
told) and the search reaches the target. SPRINT's searcher joins when it exists and builds from a
plain search config.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import warnings

import pytest

from orchestrator.config import IMPLEMENTED_METHODS, SearchConfig
from orchestrator.search import make_searcher
from search_spaces import Mask, param_count, ratio
from tests.tiny import tiny_arch

TARGET = 0.3
SETTINGS = {
    "blockpruner": {},
    "multipruner": {"split": (0.4, 0.5, 0.1), "mlp_group": 16, "head_group": 1},
    "optuna": {"trials": 10, "batch": 3, "seed": 7},
    "optuna-nsga2": {"trials": 10, "batch": 3, "sampler": "nsga2", "warm_start": "none", "widths": True,
                     "mlp_group": 16},
    "sprint": {},
}


def _methods() -> list:
    params = [pytest.param(m, id=m) for m in ("blockpruner", "multipruner", "optuna", "optuna-nsga2")]
    present = importlib.util.find_spec("orchestrator.search.sprint") is not None and "sprint" in IMPLEMENTED_METHODS
    params.append(pytest.param("sprint", id="sprint", marks=() if present else pytest.mark.skip(
        reason="SPRINT's searcher is not in orchestrator/search/ yet")))
    return params


def build(name: str):
    method = name.split("-")[0]
    search = SearchConfig(method=method, target_ratio=TARGET, **SETTINGS[name])
    try:
        searcher = make_searcher(search, tiny_arch("llama"))
    except (TypeError, ValueError) as exc:  # a searcher that needs more than a search config (e.g. a device)
        if method == "sprint":
            pytest.skip(f"SPRINT's searcher does not build from a plain search config: {exc}")
        raise
    if len(inspect.signature(searcher.observe).parameters) > 1:
        pytest.skip(f"{type(searcher).__name__}.observe takes more than the scores (an actor's step result); "
                    f"this contract drives searchers with scores alone")
    return searcher


def score(mask: Mask) -> float:
    """Deterministic perplexity: what goes matters, early blocks most; some masks fail (NaN)."""
    if mask.attn_removed >= {0, 1}:
        return math.nan
    return (10.0 + sum(3.0 / (1 + l) for l in mask.attn_removed) + sum(5.0 / (1 + l) for l in mask.mlp_removed)
            + sum(0.5 / w for _, w in mask.head_units) + sum(8.0 / w for _, w in mask.mlp_width))


def drive(searcher) -> list[tuple[tuple[Mask, ...], Mask | None, str]]:
    proposals = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # failed (NaN) trials warn
        while (p := searcher.suggest()) is not None:
            assert p.masks and all(isinstance(m, Mask) for m in p.masks)
            proposals.append((p.masks, p.base, p.label))
            searcher.observe({m: score(m) for m in p.masks})
            assert len(proposals) < 1000, "the search does not end"
    return proposals


@pytest.fixture(params=_methods())
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
