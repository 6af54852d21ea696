"""Racing for the greedy methods (BlockPruner, MultiPruner's stages): most candidates on few windows.

A greedy step scores every candidate on every calibration window and keeps one. Racing scores each
step in rounds, on the fidelity levels of :meth:`~orchestrator.scorer.Scorer.score_upto`: one round
per entry of ``windows`` (window counts, increasing), then a last round on all windows.

1. every candidate on the first ``windows[0]`` calibration windows;
2. each later round scores only the entrants of the round before that made the cut: the ``keep``
   best of it plus any whose log-perplexity lies within that round's ``margin`` of the ``keep``-th
   best. A round's margin is at least ``min_margin`` and otherwise 3 standard deviations of how far
   that round was off for the candidates that reached the last round so far, finalists and probes
   (log full ppl - log round ppl, centred per step: a shift shared by a step's candidates changes no
   ranking). A round on more windows is off by less, so its margin is narrower: successive halving
   with cut-offs measured, not fixed.

Each cut also sends on ``probes`` of the candidates it cut, the best of them: a probe skips the
later cuts and is scored on all windows like a finalist. Finalists are the candidates the early
rounds scored luckily, so their errors alone understate the spread (measured on SmolLM2 at round 1:
0.017 over finalists, 0.025 over the 20 best of each step); the best cut candidate is more often one
scored unluckily, so its error pulls the other way. A probe that beats every finalist on all
windows is chosen: the decision the cut alone would have got wrong (``probe_won`` in ``summary()``).

``windows=4`` is one round on 4 windows before the last; ``windows=(4, 8, 16)`` three. A round
reads the windows of the rounds before it from the cache, so a candidate forwards each window at
most once. The greedy searcher then decides on the full scores; a candidate that did not reach the
last round is told ``inf`` (it cannot be chosen). With ``audit``, the last round scores every
candidate (the exact step) while racing still decides, and every step where the exact choice
differs is recorded with what it cost. ``summary()`` (``search.json``) has the counts, the margins
and the audit.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from search_spaces import Mask, rank_value

from .base import Proposal, Searcher, Step


class RacingSearcher(Searcher):
    """Wraps a greedy searcher (``inner``); its contract, with each round of every step as one proposal."""

    def __init__(self, inner: Searcher, *, windows: int | Sequence[int], keep: int = 3, min_margin: float = 0.01,
                 probes: int = 1, audit: bool = False) -> None:
        rounds = (windows,) if isinstance(windows, int) else tuple(windows)
        if (not rounds or any(w < 1 for w in rounds) or any(b <= a for a, b in zip(rounds, rounds[1:]))
                or keep < 1 or min_margin < 0 or probes < 0):
            raise ValueError(f"racing needs windows >= 1 (or increasing window counts), keep >= 1, "
                             f"min_margin >= 0 and probes >= 0; got {windows}, {keep}, {min_margin}, {probes}")
        self.inner, self.keep, self.min_margin, self.probes, self.audit = inner, keep, min_margin, probes, audit
        self.levels: tuple[int, ...] = rounds  # the window counts of the rounds before the last
        self._step: Proposal | None = None  # the inner searcher's proposal being raced
        self._round = 0  # index into levels; len(levels): the last round, on every window
        self._scores: list[dict[Mask, float]] = []  # this step's scores, one dict per round so far
        self._entrants: list[Mask] = []  # who runs in the pending round
        self._probes: list[Mask] = []  # this step's cut candidates sent on to the last round
        self._counts: list[int] = []  # this step's entrants per round before the last
        self._margins: list[float] = []  # this step's margin per cut
        self._errors: list[list[list[float]]] = [[] for _ in rounds]  # per round, per step: log full - log round
        self.steps: list[dict[str, Any]] = []  # per step: candidates, finalists, margins (and audit)

    @property
    def windows(self) -> int:
        """The first round's window count."""
        return self.levels[0]

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
            self._step, self._round, self._entrants = step, 0, list(step.masks)
            self._scores, self._counts, self._margins, self._probes = [], [], [], []
        step = self._step
        if self._round < len(self.levels):
            windows = self.levels[self._round]
            return Proposal(tuple(self._entrants), step.base, f"{step.label} (racing: {windows} windows)",
                            fidelity=windows, levels=self.levels, window_set=step.window_set)
        masks = step.masks if self.audit else tuple(self._entrants)
        return Proposal(masks, step.base, f"{step.label} (racing: finalists)", levels=self.levels,
                        window_set=step.window_set)

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._step is None:
            raise RuntimeError("observe() called without a pending suggest()")
        if self._round < len(self.levels):
            self._counts.append(len(self._entrants))
            self._scores.append({m: scores[m] for m in self._entrants})
            self._margins.append(self.margin(self._round))
            going, cut = self._select(self._scores[-1], self._margins[-1])
            self._probes += cut[:self.probes]
            self._entrants = [m for m in self._entrants if m in going or m in self._probes]  # proposal order
            # a round that could cut no one is skipped: the last one reads its windows from the cache anyway
            self._round = len(self.levels) if self._contenders(going) <= self.keep else self._round + 1
            return
        step, self._step = self._step, None
        finalists = self._entrants
        full = {m: scores[m] for m in (step.masks if self.audit else finalists)}
        record: dict[str, Any] = {"label": step.label, "candidates": len(step.masks), "finalists": len(finalists),
                                  "probes": len(self._probes), "rounds": self._counts,
                                  "margin": self._margins[0], "margins": self._margins}
        told = {m: full[m] if m in finalists else math.inf for m in step.masks}
        for r, low in enumerate(self._scores):
            errors = [math.log(full[m]) - math.log(low[m]) for m in finalists if m in low
                      and math.isfinite(full[m]) and math.isfinite(low[m]) and full[m] > 0 and low[m] > 0]
            if len(errors) >= 2:
                self._errors[r].append(errors)
        before = len(self.inner.path)
        self.inner.observe(told)
        if len(self.inner.path) > before and self.inner.path[-1].mask in self._probes:
            record["probe_won"] = True
        if self.audit and len(self.inner.path) > before:
            raced = self.inner.path[-1]
            exact = min((m for m in step.masks if m != step.base), key=lambda m: rank_value(full[m]))
            if exact != raced.mask:
                record["changed"] = {"racing": raced.mask.to_dict(), "exact": exact.to_dict(),
                                     "racing_ppl": raced.ppl, "exact_ppl": full[exact]}
        self.steps.append(record)

    # ---- who goes on ----------------------------------------------------------------------------------
    def margin(self, round: int = 0) -> float:
        """Round ``round``'s allowance in log-perplexity: ``min_margin``, or 3 x the spread of that
        round's errors seen so far (centred per step), whichever is larger."""
        centred = [e - statistics.fmean(step) for step in self._errors[round] for e in step]
        spread = statistics.pstdev(centred) if len(centred) >= 2 else 0.0
        return max(self.min_margin, 3 * spread)

    def _contenders(self, masks: Sequence[Mask]) -> int:
        return sum(m != self._step.base for m in masks)

    def _select(self, low: Mapping[Mask, float], margin: float) -> tuple[list[Mask], list[Mask]]:
        """``(going, cut)``: the entrants that make this round's cut (and the base, whose score is
        always needed), and the contenders it cuts, best first. Probes are neither: they go on."""
        masks, base = self._entrants, self._step.base
        ranked = sorted((m for m in masks if m != base and m not in self._probes), key=lambda m: rank_value(low[m]))
        if not ranked:
            return [m for m in masks if m not in self._probes], []
        going = ranked[:self.keep]
        kth = rank_value(low[going[-1]])
        if math.isfinite(kth) and kth > 0:
            bound = math.log(kth) + margin
            going += [m for m in ranked[self.keep:] if 0 < low[m] and math.isfinite(low[m])
                      and math.log(low[m]) <= bound]
        cut = [m for m in ranked if m not in going and math.isfinite(rank_value(low[m]))]
        if base in masks:  # the starting model's own score (the dense ppl) is always needed
            going.append(base)
        return going, cut

    def summary(self) -> dict[str, Any] | None:
        inner = self.inner.summary() or {}
        changed = [s for s in self.steps if "changed" in s]
        return {**inner, "racing": {"windows": list(self.levels), "keep": self.keep, "min_margin": self.min_margin,
                                    "probes": self.probes, "audit": self.audit, "steps": self.steps,
                                    "candidates": sum(s["candidates"] for s in self.steps),
                                    "finalists": sum(s["finalists"] for s in self.steps),
                                    "probe_won": sum("probe_won" in s for s in self.steps),
                                    "changed": len(changed) if self.audit else None}}
