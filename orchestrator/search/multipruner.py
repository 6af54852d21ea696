"""MultiPruner (Munoz, Yuan, Jain, 2025): blocks, then MLP channel groups, then head units.

The budget split ``a:b:c`` of the target ratio ``T`` bounds each stage: blocks up to ``a*T``, MLP
width up to ``(a+b)*T``, head units up to ``T``. Widths refer to the L1-reordered model (the
evaluators reorder their replica once), so "keep w" means "keep the w most important".
"""

from __future__ import annotations

from search_spaces import Arch, Mask
from search_spaces.budget import stage_budgets

from .greedy import GreedySearcher, Stage, block_candidates, head_candidates, mlp_width_candidates


class MultiPrunerSearcher(GreedySearcher):
    def __init__(self, arch: Arch, target_ratio: float, split: tuple[float, float, float], mlp_group: int,
                 head_group: int = 1, max_steps: int | None = None, start: Mask | None = None) -> None:
        budgets = stage_budgets(split, target_ratio)
        stages = [Stage("blocks", budgets[0], block_candidates(arch)),
                  Stage("mlp width", budgets[1], mlp_width_candidates(arch, mlp_group)),
                  Stage("heads", budgets[2], head_candidates(arch, head_group))]
        # A stage with no share is left out, so the last stage with a share is the final one.
        super().__init__(arch, [s for s, share in zip(stages, split) if share > 0], max_steps, start)
        self.split, self.mlp_group, self.head_group = split, mlp_group, head_group
