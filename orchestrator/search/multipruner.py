"""MultiPruner (Munoz, Yuan, Jain, 2025): blocks, then MLP channel groups, then head units.

The budget split ``a:b:c`` of the target ratio ``T`` bounds each stage: blocks up to ``a*T``, MLP
width up to ``(a+b)*T``, head units up to ``T``. Widths refer to the L1-reordered model (the
evaluators reorder their replica once), so "keep w" means "keep the w most important".
``order`` runs the stages in another order (``rayprune tune`` searches it); the shares keep their
meaning and the budgets accumulate in the order the stages run.
"""

from __future__ import annotations

from search_spaces import Arch, Mask
from search_spaces.budget import stage_budgets

from .greedy import GreedySearcher, Stage, block_candidates, head_candidates, mlp_width_candidates


#: Stage names as ``search.order`` spells them, in MultiPruner's own order.
STAGE_ORDER: tuple[str, ...] = ("blocks", "mlp", "heads")


class MultiPrunerSearcher(GreedySearcher):
    def __init__(self, arch: Arch, target_ratio: float, split: tuple[float, float, float], mlp_group: int,
                 head_group: int = 1, max_steps: int | None = None, start: Mask | None = None,
                 order: tuple[str, ...] | None = None) -> None:
        order = tuple(order or STAGE_ORDER)
        if sorted(order) != sorted(STAGE_ORDER):
            raise ValueError(f"order {order} must name each of {', '.join(STAGE_ORDER)} once")
        shares = dict(zip(STAGE_ORDER, split))
        budgets = stage_budgets(tuple(shares[name] for name in order), target_ratio)  # type: ignore[arg-type]
        make = {"blocks": lambda b: Stage("blocks", b, block_candidates(arch)),
                "mlp": lambda b: Stage("mlp width", b, mlp_width_candidates(arch, mlp_group)),
                "heads": lambda b: Stage("heads", b, head_candidates(arch, head_group))}
        stages = [make[name](budget) for name, budget in zip(order, budgets)]
        # A stage with no share is left out, so the last stage with a share is the final one.
        super().__init__(arch, [s for s, name in zip(stages, order) if shares[name] > 0], max_steps, start)
        self.split, self.mlp_group, self.head_group, self.order = split, mlp_group, head_group, order
