"""Racing for the greedy methods (BlockPruner, MultiPruner's stages): most candidates on few windows.

A greedy step scores every candidate on every calibration window and keeps one. Racing scores each
step in two rounds, on the fidelity levels of :meth:`~orchestrator.scorer.Scorer.score_upto`:

1. every candidate on the first ``windows`` calibration windows;
2. on all windows, only the ``keep`` best of round 1 plus any whose round-1 log-perplexity lies
   within ``margin`` of the ``keep``-th best. The margin is at least ``min_margin`` and otherwise
   3 standard deviations of how far round 1 was off for the candidates that reached round 2 so far
   (log full ppl - log round-1 ppl, centred per step: a shift shared by a step's candidates changes
   no ranking).

The greedy searcher then decides on the full scores; a candidate that did not reach round 2 is
told ``inf`` (it cannot be chosen). Round 2 reads round 1's windows from the cache, so a finalist
forwards only the windows it lacks. With ``audit``, round 2 scores every candidate (the exact step)
while racing still decides, and every step where the exact choice differs is recorded with what it
cost. ``summary()`` (``search.json``) has the counts, the margins and the audit.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping

from search_spaces import Mask, rank_value

from .base import Proposal, Searcher, Step


class RacingSearcher(Searcher):
    """Wraps a greedy searcher (``inner``); its contract, with round 1 and round 2 of every step as
    two proposals."""

    def __init__(self, inner: Searcher, *, windows: int, keep: int = 3, min_margin: float = 0.01,
                 audit: bool = False) -> None:
        if windows < 1 or keep < 1 or min_margin < 0:
            raise ValueError(f"racing needs windows >= 1, keep >= 1 and min_margin >= 0; got {windows}, {keep}, "
                             f"{min_margin}")
        self.inner, self.windows, self.keep, self.min_margin, self.audit = inner, windows, keep, min_margin, audit
        self.levels = (windows,)
        self._step: Proposal | None = None  # the inner searcher's proposal being raced
        self._round = 0
        self._low: dict[Mask, float] = {}
        self._finalists: list[Mask] = []
        self._errors: list[list[float]] = []  # per step: log full - log round 1 of its finalists
        self.steps: list[dict[str, Any]] = []  # per step: candidates, finalists, margin (and audit)

    # ---- the inner searcher's state -------------------------------------------------------------------
    @property
    def path(self) -> list[Step]:  # type: ignore[override]
        return self.inner.path

    @property
    def dense_ppl(self) -> float | None:  # type: ignore[override]
        return self.inner.dense_ppl

    @property
    def current(self) -> Mask:
        return self.inner.current

    def references(self) -> dict[str, Mask]:
        return self.inner.references()

    # ---- protocol -----------------------------------------------------------------------------------
    def suggest(self) -> Proposal | None:
        if self._step is None:
            step = self.inner.suggest()
            if step is None:
                return None
            self._step, self._round = step, 1
            return Proposal(step.masks, step.base, f"{step.label} (racing: {self.windows} windows)",
                            fidelity=self.windows, levels=self.levels, window_set=step.window_set)
        masks = self._step.masks if self.audit else tuple(self._finalists)
        return Proposal(masks, self._step.base, f"{self._step.label} (racing: finalists)", levels=self.levels,
                        window_set=self._step.window_set)

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._step is None:
            raise RuntimeError("observe() called without a pending suggest()")
        if self._round == 1:
            self._low = {m: scores[m] for m in self._step.masks}
            self._finalists = self._select()
            self._round = 2
            return
        step, self._step = self._step, None
        full = {m: scores[m] for m in (step.masks if self.audit else self._finalists)}
        record: dict[str, Any] = {"label": step.label, "candidates": len(step.masks),
                                  "finalists": len(self._finalists), "margin": self.margin()}
        told = {m: full[m] if m in self._finalists else math.inf for m in step.masks}
        errors = [math.log(full[m]) - math.log(self._low[m]) for m in self._finalists
                  if math.isfinite(full[m]) and math.isfinite(self._low[m]) and full[m] > 0 and self._low[m] > 0]
        if len(errors) >= 2:
            self._errors.append(errors)
        before = len(self.inner.path)
        self.inner.observe(told)
        if self.audit and len(self.inner.path) > before:
            raced = self.inner.path[-1]
            exact = min((m for m in step.masks if m != step.base), key=lambda m: rank_value(full[m]))
            if exact != raced.mask:
                record["changed"] = {"racing": raced.mask.to_dict(), "exact": exact.to_dict(),
                                     "racing_ppl": raced.ppl, "exact_ppl": full[exact]}
        self.steps.append(record)

    # ---- round 2's entrants -------------------------------------------------------------------------
    def margin(self) -> float:
        """Round 1's allowance in log-perplexity: ``min_margin``, or 3 x the spread of round 1's
        errors seen so far (centred per step), whichever is larger."""
        centred = [e - statistics.fmean(step) for step in self._errors for e in step]
        spread = statistics.pstdev(centred) if len(centred) >= 2 else 0.0
        return max(self.min_margin, 3 * spread)

    def _select(self) -> list[Mask]:
        masks, base = list(self._step.masks), self._step.base
        ranked = sorted((m for m in masks if m != base), key=lambda m: rank_value(self._low[m]))
        if not ranked:
            return masks
        finalists = ranked[:self.keep]
        kth = rank_value(self._low[finalists[-1]])
        if math.isfinite(kth) and kth > 0:
            bound = math.log(kth) + self.margin()
            finalists += [m for m in ranked[self.keep:] if 0 < self._low[m] and math.isfinite(self._low[m])
                          and math.log(self._low[m]) <= bound]
        if base in masks:  # the starting model's own score (the dense ppl) is always needed
            finalists.append(base)
        return [m for m in masks if m in finalists]  # proposal order

    def summary(self) -> dict[str, Any] | None:
        inner = self.inner.summary() or {}
        changed = [s for s in self.steps if "changed" in s]
        return {**inner, "racing": {"windows": self.windows, "keep": self.keep, "min_margin": self.min_margin,
                                    "audit": self.audit, "steps": self.steps,
                                    "candidates": sum(s["candidates"] for s in self.steps),
                                    "finalists": sum(s["finalists"] for s in self.steps),
                                    "changed": len(changed) if self.audit else None}}
