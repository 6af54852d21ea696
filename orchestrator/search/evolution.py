"""Evolutionary search on block masks, after EvoPress (Sieberling et al., ICML 2025).

The search runs in two phases inside one campaign:

1. Warm start: a BlockPruner search to the target (its evaluations land in the cache like any
   greedy campaign's). Its final mask is the first parent: the search never ends worse than greedy.
2. Generations: each ``suggest()`` proposes the parent's ``offspring`` mutations
   (:func:`search_spaces.evolution.mutate`: swaps of a removed and a kept block of one kind, so
   every offspring has the parent's exact parameter count), all at once so the pool stays full,
   branching from the parent for prefix reuse. The best of parent and offspring (lowest
   calibration perplexity; NaN ranks last) is the next parent.

It stops after ``generations`` (default EvoPress's ``k (n - k) / 1.5``, see
:func:`~search_spaces.evolution.default_generations`), once ``max_evaluations`` offspring were
scored, or once the generations' scores cover ``max_tokens`` calibration tokens (every offspring on
the windows of its first step, every survivor on the rest; a generation that started finishes).
The offspring are drawn from a seeded generator whatever the scores, and a mask already scored (the
cache, an earlier generation) is answered from memory and not proposed again, so a campaign stopped
mid-generation replays to the same result from its cache.

The path is BlockPruner's, followed by one step of kind ``trial`` (``layer`` = generation) per
improvement of the parent; ``references()`` has the greedy mask scored on the held-out windows too.
With ``first_windows``, selection runs in two steps, as EvoPress's does: every offspring is scored on
the first ``first_windows`` calibration windows, the ``survivors`` best of them on all windows.

With ``widths`` (after Týr-the-Pruner), every block has a level (groups of head units or MLP
channels kept; 0: removed) and a mutation moves levels between layers of one kind
(:func:`search_spaces.evolution_levels.mutate_levels`): the greedy mask is a point of that space (its
blocks at level 0 or full) and the offspring stay at its ratio to within the norms of the blocks
that reach or leave level 0, never below it by more nor below the target. The fitness is whatever
the campaign scores with (perplexity, or KL to the dense model): the searcher only ranks.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Mapping

from search_spaces import Arch, Mask, param_count, rank_value, ratio
from search_spaces.cost import dense_params
from search_spaces.evolution import EVOPRESS_MAX_SWAPS, default_generations, mutate, swappable
from search_spaces.evolution_levels import default_level_generations, movable_levels, mutate_levels
from search_spaces.mask_space import MaskSpace

from .base import Proposal, Searcher, Step
from .blockpruner import BlockPrunerSearcher

log = logging.getLogger("rayprune")


class EvolutionSearcher(Searcher):
    """Contract of :class:`~.base.Searcher`, plus: every offspring has the greedy mask's parameter
    count, no mask is proposed twice at one fidelity, and at most ``max_evaluations`` offspring are
    scored.

    ``first_windows`` turns on EvoPress's multi-step selection: every offspring is scored on the
    first ``first_windows`` calibration windows, and only the ``survivors`` best of them on all
    windows (the parent's full score is known), from cached segments of the windows
    (``Proposal.levels``), so a survivor's full score re-forwards nothing.

    ``widths`` searches per-layer levels: head units in groups of ``head_group``, MLP channels in
    groups of ``mlp_group`` (each must divide its layer's width).
    """

    def __init__(self, arch: Arch, target_ratio: float, *, offspring: int = 16, generations: int | None = None,
                 max_swaps: int = EVOPRESS_MAX_SWAPS, seed: int = 0, max_evaluations: int | None = None,
                 first_windows: int | None = None, survivors: int = 2, widths: bool = False,
                 mlp_group: int | None = None, head_group: int = 1, max_tokens: int | None = None,
                 calibration: tuple[int, int] | None = None,
                 known: Mapping[Mask, float] | None = None) -> None:
        if offspring < 1 or max_swaps < 1 or survivors < 1 or any(v is not None and v < 1 for v in (
                generations, max_evaluations, first_windows, max_tokens)):
            raise ValueError(f"offspring, max_swaps, survivors, generations, max_evaluations, first_windows and "
                             f"max_tokens must be >= 1; got {offspring}, {max_swaps}, {survivors}, {generations}, "
                             f"{max_evaluations}, {first_windows}, {max_tokens}")
        if max_tokens is not None and calibration is None:
            raise ValueError("max_tokens needs the calibration set's shape (windows, tokens per window) to count "
                             "the tokens of each score")
        self.arch, self.target_ratio = arch, target_ratio
        self.space: MaskSpace | None = None
        if widths:
            self.space = MaskSpace(arch, target_ratio, widths=True, mlp_group=mlp_group, head_group=head_group)
            if problems := self.space.group_problems():
                raise ValueError("; ".join(problems))
        self.min_removed = 0  # offspring remove at least this many parameters (widths; set from the greedy mask)
        self.offspring, self.max_swaps, self.seed = offspring, max_swaps, seed
        self.generations, self.max_evaluations, self.max_tokens = generations, max_evaluations, max_tokens
        self.calibration = calibration  # (windows, tokens predicted per window): counts the tokens of each score
        self.tokens = 0  # calibration tokens the generations' scores cover (cached or not, as evaluations)
        self.first_windows, self.survivors = first_windows, survivors
        self.levels: tuple[int, ...] = (first_windows,) if first_windows else ()
        self.path: list[Step] = []
        self._known: dict[Mask, float] = dict(known or {})  # scores on every calibration window
        self._low: dict[Mask, float] = {}  # scores on the first first_windows windows
        self._greedy: BlockPrunerSearcher | None = BlockPrunerSearcher(arch, target_ratio)
        self._rng = random.Random(seed)
        self.parent: Mask | None = None
        self.parent_ppl = float("nan")
        self.greedy_mask: Mask | None = None
        self.greedy_ppl = float("nan")
        self.generation = 0  # generations selected so far
        self.evaluations = 0  # offspring scored (from the cache or the pool)
        self.history: list[dict[str, Any]] = []  # per generation: best offspring, parent after it
        self._stage: str | None = None  # within a generation: "low" (all offspring), then "full" (survivors)
        self._children: list[Mask] = []
        self._finalists: list[Mask] = []
        self._pending: Proposal | None = None

    # ---- protocol -----------------------------------------------------------------------------------
    def suggest(self) -> Proposal | None:
        if self._greedy is not None:
            proposal = self._greedy.suggest()
            if proposal is not None:
                return proposal
            self._start()
        while True:
            if self._stage is None:
                if self._done():
                    return None
                self._children = self._draw()
                self._stage = "low" if self.first_windows else "full"
                self._finalists = [] if self.first_windows else list(self._children)
            self._pending = self._proposal()
            if self._pending is not None:
                return self._pending
            self._advance()  # nothing left to score at this stage

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._greedy is not None:
            self._greedy.observe(scores)
            self._known.update(scores)
            self.path, self.dense_ppl = list(self._greedy.path), self._greedy.dense_ppl
            return
        if self._pending is None:
            raise RuntimeError("observe() called without a pending suggest()")
        got = {m: scores[m] for m in self._pending.masks}  # KeyError: a mask of the proposal was not scored
        (self._low if self._stage == "low" else self._known).update(got)
        self._pending = None

    # ---- the evolution ------------------------------------------------------------------------------
    def _start(self) -> None:
        greedy, self._greedy = self._greedy, None
        self.path, self.dense_ppl = list(greedy.path), greedy.dense_ppl
        self.parent = self.greedy_mask = greedy.current
        self.parent_ppl = self.greedy_ppl = greedy.path[-1].ppl if greedy.path else self._known.get(Mask(), float("nan"))
        if self.space is not None:
            # Level swaps move norms in and out (hidden_size each): stay within max_swaps norms of the
            # greedy count, and never below the target.
            dense = dense_params(self.arch)
            greedy_removed = dense - param_count(self.parent, self.arch)
            self.min_removed = max(math.ceil(self.target_ratio * dense - 1e-9),
                                   greedy_removed - self.max_swaps * self.arch.hidden_size)
        if self.generations is None:
            self.generations = (default_level_generations(self.space, self.parent) if self.space is not None
                                else default_generations(self.parent, self.arch.num_layers))
        if (movable_levels(self.space, self.parent) == 0 if self.space is not None
                else not swappable(self.parent, self.arch.num_layers)):
            log.warning("evolution: the greedy mask %s has nothing to swap; it is the result", self.parent.to_json())
            self.generations = 0
        log.info("evolution from the greedy mask (ppl %.3f, ratio %.4f): %d generations of %d offspring%s",
                 self.parent_ppl, ratio(self.parent, self.arch), self.generations, self.offspring,
                 f", {self.survivors} survivors of {self.first_windows} windows each" if self.first_windows else "")

    def _done(self) -> bool:
        if self.generation >= (self.generations or 0):
            return True
        if self.max_tokens is not None and self.tokens >= self.max_tokens:
            return True
        return self.max_evaluations is not None and self.evaluations >= self.max_evaluations

    def _count_tokens(self) -> None:
        """Add the tokens of the stage just scored: every entrant on the windows that stage adds."""
        if self.calibration is None:
            return
        windows, per_window = self.calibration
        first = min(self.first_windows or windows, windows)
        if self._stage == "low":
            self.tokens += len(self._children) * first * per_window
        else:
            self.tokens += len(self._finalists) * (windows - first if self.first_windows else windows) * per_window

    def _draw(self) -> list[Mask]:
        """This generation's distinct offspring (drawn from the seeded generator, whatever was scored)."""
        budget = self.offspring if self.max_evaluations is None else min(self.offspring,
                                                                          self.max_evaluations - self.evaluations)
        children: list[Mask] = []
        for _ in range(50 * budget):  # a small space may hold fewer distinct neighbours
            child = (mutate_levels(self.parent, self.space, self._rng, self.max_swaps, self.min_removed)
                     if self.space is not None else mutate(self.parent, self.arch.num_layers, self._rng, self.max_swaps))
            if child not in children:
                children.append(child)
            if len(children) == budget:
                break
        return children

    def _proposal(self) -> Proposal | None:
        """What this stage still needs scored (None: nothing)."""
        label = f"generation {self.generation + 1}"
        if self._stage == "low":
            missing = tuple(c for c in self._children if c not in self._low)
            return Proposal(missing, base=self.parent, label=f"{label} ({self.first_windows} windows)",
                            fidelity=self.first_windows, levels=self.levels) if missing else None
        missing = tuple(c for c in self._finalists if c not in self._known)
        return Proposal(missing, base=self.parent, label=label, levels=self.levels) if missing else None

    def _advance(self) -> None:
        self._count_tokens()
        if self._stage == "low":  # the best few on few windows go on to every window
            self._finalists = sorted(self._children, key=lambda m: rank_value(self._low[m]))[:self.survivors]
            self._stage = "full"
        else:
            self._select()
            self._stage = None

    def _select(self) -> None:
        self.generation += 1
        self.evaluations += len(self._children)
        best = min(self._finalists, key=lambda m: rank_value(self._known[m]))
        best_ppl = self._known[best]
        improved = rank_value(best_ppl) < rank_value(self.parent_ppl)
        if improved:
            self.parent, self.parent_ppl = best, best_ppl
            self.path.append(Step(step=len(self.path) + 1, kind="trial", layer=self.generation, ppl=best_ppl,
                                  ratio=ratio(best, self.arch), mask=best, params=param_count(best, self.arch)))
            log.info("generation %d: ppl %.3f (greedy %.3f)", self.generation, best_ppl, self.greedy_ppl)
        self.history.append({"generation": self.generation, "best_offspring_ppl": best_ppl,
                             "parent_ppl": self.parent_ppl, "improved": improved})

    # ---- results ------------------------------------------------------------------------------------
    @property
    def current(self) -> Mask:
        return self.parent if self.parent is not None else super().current

    def references(self) -> dict[str, Mask]:
        return {"greedy": self.greedy_mask} if self.greedy_mask is not None and self.greedy_mask != self.current else {}

    def summary(self) -> dict[str, Any] | None:
        if self.greedy_mask is None:
            return None
        return {"method": "evolution", "widths": self.space is not None, "offspring": self.offspring, "max_swaps": self.max_swaps, "seed": self.seed,
                "first_windows": self.first_windows, "survivors": self.survivors if self.first_windows else None,
                "generations": self.generation, "evaluations": self.evaluations,
                "tokens": self.tokens if self.calibration else None, "max_tokens": self.max_tokens,
                "greedy_ppl": self.greedy_ppl,
                "best_ppl": self.parent_ppl, "greedy_mask": self.greedy_mask.to_dict(),
                "best_mask": self.parent.to_dict(), "history": self.history}
