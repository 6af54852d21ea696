"""BlockPruner (Zhong et al., 2024): greedy removal of whole attention or MLP blocks.

Each step scores every remaining block's removal on the calibration set and keeps the one with the
lowest perplexity (ties: lower block index). It stops once the removed-parameter ratio reaches the
target, after ``max_steps`` steps, or when nothing is left to remove.
"""

from __future__ import annotations

from search_spaces import Arch, Mask

from .greedy import GreedySearcher, Stage, block_candidates


class BlockPrunerSearcher(GreedySearcher):
    def __init__(self, arch: Arch, target_ratio: float, max_steps: int | None = None, start: Mask | None = None) -> None:
        super().__init__(arch, [Stage("blocks", target_ratio, block_candidates(arch))], max_steps, start)
