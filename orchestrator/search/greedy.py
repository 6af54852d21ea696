"""Greedy removal in stages: the engine of BlockPruner and MultiPruner.

Each step proposes every candidate of the current stage (one more thing removed from the current
model), keeps the one with the lowest calibration perplexity (ties: the first candidate listed), and
records it on the path. A stage runs while the removed ratio is below its budget. How a stage that
is not the last one ends is ``stage_stop``:

- ``overshoot`` (MultiPruner's loop, ``while ratio < budget`` with every candidate proposed): a
  stage's last step may pass its budget, and the stages after it start from there;
- ``within``: candidates that would pass the budget are not proposed (the budget is "up to").

The last stage stops once the target is reached, so it may end just past it, as BlockPruner does.
``stop_ratio`` is the ratio the budgets are compared with (default: :func:`search_spaces.ratio`;
MultiPruner's own count keeps removed blocks' norm weights, ``search_spaces.budget.multipruner_ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

from search_spaces import Arch, Block, Mask, param_count, ratio

from .base import Proposal, Searcher, Step, StepKind, rank_value

Candidate = tuple[StepKind, int, Mask]  # (kind, layer, mask after the step)
StageStop = Literal["overshoot", "within"]
#: How a stage that is not the last one ends (``search.stage_stop``).
STAGE_STOPS: tuple[str, ...] = ("overshoot", "within")


@dataclass(frozen=True)
class Stage:
    name: str
    budget: float  # removed ratio this stage may reach (cumulative)
    candidates: Callable[[Mask], list[Candidate]]
    window_set: str | None = None  # the calibration set its candidates are scored on (None: the run's)


def block_candidates(arch: Arch, *, kinds_first: bool = False) -> Callable[[Mask], list[Candidate]]:
    """Every remaining block's removal, in block order (attn0, mlp0, attn1, ...); ``kinds_first``:
    every attention block, then every MLP block (MultiPruner's order, which decides its ties)."""
    order = ([Block(l, "attn") for l in range(arch.num_layers)] + [Block(l, "mlp") for l in range(arch.num_layers)]
             if kinds_first else [Block.from_index(i) for i in range(arch.num_blocks)])

    def candidates(mask: Mask) -> list[Candidate]:
        return [(b.kind, b.layer, mask.remove(b)) for b in order if not mask.removed(b)]

    return candidates


def mlp_width_candidates(arch: Arch, group: int) -> Callable[[Mask], list[Candidate]]:
    """One channel group less in any layer whose MLP is present, while ``width - group > 0``
    (MultiPruner's rule: a group need not divide the width, and a layer may end at the remainder)."""

    def candidates(mask: Mask) -> list[Candidate]:
        out = []
        for layer in range(arch.num_layers):
            width = mask.mlp_kept(layer, arch.intermediate_size)
            if width - group > 0:
                out.append(("mlp_width", layer, mask.with_mlp_width(layer, width - group)))
        return out

    return candidates


def head_candidates(arch: Arch, group: int) -> Callable[[Mask], list[Candidate]]:
    """``group`` head units less in any layer whose attention is present (one unit stays)."""

    def candidates(mask: Mask) -> list[Candidate]:
        out = []
        for layer in range(arch.num_layers):
            units = mask.heads_kept(layer, arch.num_head_units)
            if units - group >= 1:
                out.append(("attn_width", layer, mask.with_heads(layer, units - group)))
        return out

    return candidates


class GreedySearcher(Searcher):
    def __init__(self, arch: Arch, stages: list[Stage], max_steps: int | None = None, start: Mask | None = None, *,
                 stage_stop: StageStop = "within", stop_ratio: Callable[[Mask], float] | None = None) -> None:
        if not stages:
            raise ValueError("a greedy search needs at least one stage")
        if stage_stop not in STAGE_STOPS:
            raise ValueError(f"search.stage_stop {stage_stop!r} must be one of {', '.join(STAGE_STOPS)}")
        self.arch = arch
        self.stages = stages
        self.stage_stop = stage_stop
        self.stop_ratio = stop_ratio or (lambda mask: ratio(mask, arch))
        self.max_steps = max_steps
        self.start = start or Mask()
        self.path = []
        self.stage_index = 0
        self._pending: tuple[Proposal, list[Candidate]] | None = None

    @property
    def current(self) -> Mask:
        return self.path[-1].mask if self.path else self.start

    @property
    def target_ratio(self) -> float:
        return self.stages[-1].budget

    def _open_candidates(self) -> list[Candidate]:
        """Candidates of the current stage, moving on through stages that are spent."""
        if self.max_steps is not None and len(self.path) >= self.max_steps:
            return []
        while self.stage_index < len(self.stages):
            stage = self.stages[self.stage_index]
            last = self.stage_index == len(self.stages) - 1
            if self.stop_ratio(self.current) < stage.budget:
                found = stage.candidates(self.current)
                if not last and self.stage_stop == "within":
                    found = [c for c in found if ratio(c[2], self.arch) <= stage.budget + 1e-12]
                if found:
                    return found
            self.stage_index += 1
        return []

    def suggest(self) -> Proposal | None:
        candidates = self._open_candidates()
        if not candidates and self.dense_ppl is not None:
            return None
        masks = [m for *_, m in candidates]
        if self.dense_ppl is None:  # the first batch also scores the starting model itself
            masks = [self.current, *masks]
        label = f"step {len(self.path) + 1}" if candidates else "start"
        if candidates and len(self.stages) > 1:
            label += f" ({self.stages[self.stage_index].name})"
        stage = self.stages[min(self.stage_index, len(self.stages) - 1)]
        proposal = Proposal(tuple(masks), base=self.current, label=label, window_set=stage.window_set)
        self._pending = (proposal, candidates)
        return proposal

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._pending is None:
            raise RuntimeError("observe() called without a pending suggest()")
        _, candidates = self._pending
        self._pending = None
        if self.dense_ppl is None:
            self.dense_ppl = scores[self.current]
        if not candidates:
            return
        # min() keeps the first of equal keys: ties go to the candidate listed first.
        kind, layer, best = min(candidates, key=lambda c: rank_value(scores[c[2]]))
        self.path.append(Step(step=len(self.path) + 1, kind=kind, layer=layer, ppl=scores[best],
                              ratio=ratio(best, self.arch), mask=best, params=param_count(best, self.arch)))
