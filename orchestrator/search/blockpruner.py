"""BlockPruner (Zhong et al., 2024): greedy removal of whole attention or MLP blocks.

Each step scores every remaining block's removal on the calibration set and keeps the one with the
lowest perplexity (ties: lower block index). It stops once the removed-parameter ratio reaches the
target, after ``max_steps`` steps, or when nothing is left to remove.
"""

from __future__ import annotations

from typing import Mapping

from search_spaces import Arch, Block, Mask, param_count, ratio

from .base import Proposal, Searcher, Step, rank_value


class BlockPrunerSearcher(Searcher):
    def __init__(self, arch: Arch, target_ratio: float, max_steps: int | None = None, start: Mask | None = None) -> None:
        self.arch = arch
        self.target_ratio = target_ratio
        self.max_steps = max_steps
        self.start = start or Mask()
        self.path = []
        self._pending: Proposal | None = None

    @property
    def current(self) -> Mask:
        return self.path[-1].mask if self.path else self.start

    def candidates(self, mask: Mask) -> list[tuple[Block, Mask]]:
        """Every remaining block's removal, in block order (the tie-break order)."""
        blocks = (Block.from_index(i) for i in range(self.arch.num_blocks))
        return [(b, mask.remove(b)) for b in blocks if not mask.removed(b)]

    def done(self) -> bool:
        if self.max_steps is not None and len(self.path) >= self.max_steps:
            return True
        return ratio(self.current, self.arch) >= self.target_ratio or not self.candidates(self.current)

    def suggest(self) -> Proposal | None:
        if self.dense_ppl is not None and self.done():
            return None
        masks = [m for _, m in self.candidates(self.current)]
        if self.dense_ppl is None:  # the first batch also scores the starting model itself
            masks = [self.current, *masks]
        self._pending = Proposal(tuple(masks), base=self.current, label=f"step {len(self.path) + 1}")
        return self._pending

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._pending is None:
            raise RuntimeError("observe() called without a pending suggest()")
        self._pending = None
        if self.dense_ppl is None:
            self.dense_ppl = scores[self.current]
        best_block, best_mask = min(self.candidates(self.current), key=lambda c: (rank_value(scores[c[1]]), c[0].index))
        self.path.append(Step(
            step=len(self.path) + 1,
            kind=best_block.kind,
            layer=best_block.layer,
            ppl=scores[best_mask],
            ratio=ratio(best_mask, self.arch),
            mask=best_mask,
            params=param_count(best_mask, self.arch),
        ))
