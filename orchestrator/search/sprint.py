"""SPRINT (Park et al., IJCAI 2025): latency-aware sublayer pruning with in-compression tuning.

Each step removes one attention or MLP block. The candidates are ranked by local sensitivity per
second of latency saved; the ``top_k`` best get the ``down_proj`` of the MLP after them refitted by
least squares and are re-scored; the best tuned candidate is removed and its refitted weights are
kept. The heavy work of a step is one remote call (``Evaluator.sprint_step``) that receives the
whole state in a :class:`~search_spaces.sprint.StepRequest`; this searcher holds the state and the
decisions:

- which candidates to re-score after a step (``rescore_after``: those whose comparison window
  reaches the removed block; every other score is reused exactly);
- SPRINT's memory (``memory``): the tuned scores of earlier steps whose window no removal since has
  reached (``search_spaces.sprint.remember``) travel in the next request, which refits only top
  candidates without one and chooses among both. The memory is re-derived from the step results, so
  a replay (and the request keys it looks results up by) takes the same path;
- the ranking and the choice (it re-derives both from the returned numbers and refuses a result
  whose choice differs from its own);
- when to stop: ``target_ratio`` reached, ``target_speedup`` reached (estimated from the measured
  latency table), ``max_steps``, or nothing left to remove.

Protocol: ``suggest()`` returns a :class:`SprintProposal` whose only mask is the current state and
whose ``request`` is the step to run; ``observe({mask: ppl}, step=result)`` hands back the state's
calibration perplexity and the step's result. The perplexity of the model after step k therefore
arrives with step k+1 (or with the final, scoring-only request), and is filled in then.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from search_spaces import Arch, Block, Mask, param_count, ratio
from search_spaces.latency import BlockCosts, best_candidate, speedup
from search_spaces.sprint import (StepRequest, Tuned, present_blocks, remember, rescore_after, top_candidates,
                                  tuned_items)

from .base import Proposal, Searcher, Step

if TYPE_CHECKING:
    from ..config import SearchConfig


@dataclass(frozen=True)
class SprintProposal(Proposal):
    """Proposal of a SPRINT step: ``masks == (state mask,)``; ``request`` is what the actor runs."""

    request: StepRequest | None = None


@dataclass(frozen=True)
class SprintStep(Step):
    """A removal on SPRINT's path, with the estimated speedup and the refitted weights after it."""

    speedup: float = 1.0
    sensitivity: float = math.nan  # tuned local sensitivity of the removed block
    importance: float = math.nan  # sensitivity / seconds saved
    refit: Mapping[str, Any] | None = None  # {"layer", "sha", "status"} of this step's refit
    tuned: Tuned = ()  # every refitted down_proj of the model after this step: (layer, sha)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "speedup": self.speedup, "sensitivity": self.sensitivity,
                "importance": self.importance, "refit": dict(self.refit) if self.refit else None,
                "tuned_weights": {str(layer): sha for layer, sha in self.tuned}}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


class SprintSearcher(Searcher):
    scoring = "sprint_step"

    def __init__(self, arch: Arch, costs: BlockCosts, *, target_ratio: float | None = None,
                 target_speedup: float | None = None, max_steps: int | None = None, top_k: int = 5,
                 ridge: float = 0.0, checkpoint_every: int | None = None, window_set: str = "calibration",
                 metric: str = "l1", reference: str = "window", refit_target: str = "local",
                 no_mlp_score: str = "inf", memory: bool = True) -> None:
        if target_ratio is None and target_speedup is None and max_steps is None:
            raise ValueError("SPRINT needs a stopping point; set search.target_ratio or search.target_speedup")
        if costs.attn <= 0 or costs.mlp <= 0:
            raise ValueError(f"latency costs {costs} save nothing per block; re-measure the latency table")
        self.arch, self.costs = arch, costs
        self.target_ratio, self.target_speedup, self.max_steps = target_ratio, target_speedup, max_steps
        self.top_k, self.ridge, self.checkpoint_every, self.window_set = top_k, ridge, checkpoint_every, window_set
        self.options = dict(metric=metric, reference=reference, refit_target=refit_target, no_mlp_score=no_mlp_score)
        StepRequest("check", Mask(), **self.options)  # a bad option fails here, naming its choices
        self.memory = memory
        self.path: list[SprintStep] = []
        self.dense_ppl = None
        self.scores: dict[int, float] = {}  # raw sensitivities of the current model's blocks (for reuse)
        self.remembered: tuple[tuple[int, float], ...] = ()  # SPRINT's memory: still valid tuned scores
        self._weights: dict[int, str] = {}  # every refit applied, removed MLPs' included: layer -> sha
        self._last: int | None = None  # block removed by the last step
        self._parent: str | None = None  # state key of the model before the last step (memo hint)
        self._pending: SprintProposal | None = None
        self._done = False

    @classmethod
    def from_search(cls, search: SearchConfig, arch: Arch, costs: BlockCosts) -> SprintSearcher:
        """The searcher ``search`` (with its ``sprint`` section) asks for, ranking by ``costs`` (the
        scenario's measured costs; their fixed part is dropped unless ``latency_fixed``)."""
        s = search.sprint
        return cls(arch, costs if s.latency_fixed else costs.blocks_only(), target_ratio=search.target_ratio,
                   target_speedup=search.target_speedup, max_steps=search.max_steps, top_k=s.top_k, ridge=s.ridge,
                   checkpoint_every=s.checkpoint_every, metric=s.metric, reference=s.reference,
                   refit_target=s.refit_target, no_mlp_score=s.no_mlp_score, memory=s.memory)

    # ---- state --------------------------------------------------------------------------------------
    @property
    def tuned(self) -> Tuned:
        """The refitted ``down_proj`` weights of the current model's kept MLPs."""
        return self.path[-1].tuned if self.path else ()

    def _request_tuned(self, mask: Mask) -> Tuned:
        """What a request names: with the ``window`` reference the refits of removed MLPs too (the
        window runs them again, with the weights SPRINT left in them)."""
        if self.options["reference"] == "window":
            return tuple(sorted(self._weights.items()))
        return tuned_items(self._weights, mask)

    def speedup(self, mask: Mask | None = None) -> float:
        return speedup(self.current if mask is None else mask, self.arch, self.costs)

    def reached(self) -> bool:
        """True once no further step may be taken."""
        mask = self.current
        if not present_blocks(mask, self.arch.num_layers):
            return True
        if self.max_steps is not None and len(self.path) >= self.max_steps:
            return True
        if self.target_ratio is not None and ratio(mask, self.arch) >= self.target_ratio:
            return True
        return self.target_speedup is not None and self.speedup(mask) >= self.target_speedup

    # ---- protocol -----------------------------------------------------------------------------------
    def suggest(self) -> SprintProposal | None:
        if self._done:
            return None
        mask, L = self.current, self.arch.num_layers
        common = dict(window_set=self.window_set, mask=mask, tuned=self._request_tuned(mask), costs=self.costs,
                      ridge=self.ridge, checkpoint_every=self.checkpoint_every, parent=self._parent,
                      unchanged_before=self._last if self._last is not None else 0, **self.options)
        if self.reached():  # only the perplexity of the final state is left
            request = StepRequest(**{**common, "tuned": self.tuned}, top_k=0)
            label = "final model"
        else:
            present = present_blocks(mask, L)
            fresh = present if self._last is None else rescore_after(mask, L, self._last)
            fresh = sorted(set(fresh) | {s for s in present if s not in self.scores})
            known = tuple((s, self.scores[s]) for s in present if s not in fresh)
            request = StepRequest(**common, candidates=tuple(fresh), known=known, top_k=self.top_k,
                                  remembered=self.remembered if self.memory else ())
            label = f"step {len(self.path) + 1}"
        self._pending = SprintProposal((mask,), base=mask, label=label, request=request)
        return self._pending

    def observe(self, scores: Mapping[Mask, float], step: Mapping[str, Any] | None = None) -> None:
        """``scores``: the calibration perplexity of the proposal's state; ``step``: the actor's result."""
        if self._pending is None:
            raise RuntimeError("observe() called without a pending suggest()")
        proposal, self._pending = self._pending, None
        request = proposal.request
        ppl = scores[proposal.masks[0]]
        if self.path:
            self.path[-1] = dataclasses.replace(self.path[-1], ppl=ppl)
        else:
            self.dense_ppl = ppl
        if request.top_k == 0:
            self._done = True
            return
        if step is None:
            raise ValueError("a SPRINT step proposal needs its step result: observe(scores, step=result)")
        self._record(request, step)

    def _record(self, request: StepRequest, step: Mapping[str, Any]) -> None:
        ranked = {**dict(request.known), **{int(k): float(v) for k, v in step["sensitivity"].items()}}
        top = top_candidates(ranked, self.costs, request.top_k)
        if list(step["top"]) != top:
            raise RuntimeError(f"the actor tuned {list(step['top'])} but the ranking gives {top}; "
                               f"actor and driver run different rayprune versions")
        tuned = {int(t["block"]): float(t["sensitivity"]) for t in step["tuned"]}
        expected = set(top) | {s for s, _ in request.remembered}
        if set(tuned) != expected or any(not _same(tuned[s], v) for s, v in request.remembered):
            raise RuntimeError(f"the actor's tuned records name {sorted(tuned)}, not the top {top} and the "
                               f"remembered scores; actor and driver run different rayprune versions")
        chosen = best_candidate(tuned, self.costs)
        choice = step["choice"]
        if chosen is None or int(choice["block"]) != chosen:
            raise RuntimeError(f"the actor chose block {choice and choice['block']} but the tuned scores give "
                               f"{chosen}; actor and driver run different rayprune versions")
        block = Block.from_index(chosen)
        mask = request.mask.remove(block)
        refit = None
        if choice.get("sha"):
            layer = int(choice["target"]) // 2
            self._weights[layer] = choice["sha"]
            refit = {"layer": layer, "sha": choice["sha"], "status": choice["status"]}
        elif choice.get("status") not in (None, "no-mlp"):
            refit = {"layer": int(choice["target"]) // 2, "sha": None, "status": choice["status"]}
        self.scores = {s: v for s, v in ranked.items() if s != chosen}
        self.remembered = remember(step["tuned"], chosen)
        self._parent, self._last = step.get("state"), chosen
        saved = self.costs.of(block.kind)
        self.path.append(SprintStep(
            step=len(self.path) + 1, kind=block.kind, layer=block.layer, ppl=math.nan, ratio=ratio(mask, self.arch),
            mask=mask, params=param_count(mask, self.arch), speedup=self.speedup(mask),
            sensitivity=tuned[chosen], importance=tuned[chosen] / saved, refit=refit,
            tuned=tuned_items(self._weights, mask)))
