"""MultiPruner (Munoz, Yuan, Jain, 2025): blocks, then MLP channel groups, then head units.

The budget split ``a:b:c`` of the target ratio ``T`` bounds each stage: blocks up to ``a*T``, MLP
width up to ``(a+b)*T``, head units up to ``T``. Widths refer to the L1-reordered model (the
evaluators reorder their replica once), so "keep w" means "keep the w most important".
``order`` runs the stages in another order (``rayprune tune`` searches it); the shares keep their
meaning and the budgets accumulate in the order the stages run.

As MultiPruner's code (``run_multipruner.py``) does, by default (``stage_stop="overshoot"``):
each stage runs ``while ratio < budget`` with every candidate proposed, so its last step may pass
its budget (the published Llama-2-7B 22% run ended its block stage at 10.97% against 9.68%), and
the ratio is MultiPruner's count (removed blocks' norm weights kept); block candidates are listed
attention first, then MLP (its tie order); an MLP group need not divide the width (a step is
proposed while ``width - group > 0``). ``stage_stop="within"`` is rayprune's earlier rule: a stage
that is not the last never passes its budget, on rayprune's ratio.

``width_windows`` names the calibration set of the width stages: under ``data.protocol:
multipruner`` the 128 Alpaca rows its code draws for them (``calibration_width``), while the block
stage uses the 256 drawn after (``calibration``). Path perplexities are each stage's own.
"""

from __future__ import annotations

from search_spaces import Arch, Mask
from search_spaces.budget import multipruner_ratio, stage_budgets

from .greedy import GreedySearcher, Stage, StageStop, block_candidates, head_candidates, mlp_width_candidates


#: Stage names as ``search.order`` spells them, in MultiPruner's own order.
STAGE_ORDER: tuple[str, ...] = ("blocks", "mlp", "heads")


class MultiPrunerSearcher(GreedySearcher):
    def __init__(self, arch: Arch, target_ratio: float, split: tuple[float, float, float], mlp_group: int,
                 head_group: int = 1, max_steps: int | None = None, start: Mask | None = None,
                 order: tuple[str, ...] | None = None, stage_stop: StageStop = "overshoot",
                 width_windows: str | None = None) -> None:
        order = tuple(order or STAGE_ORDER)
        if sorted(order) != sorted(STAGE_ORDER):
            raise ValueError(f"order {order} must name each of {', '.join(STAGE_ORDER)} once")
        if mlp_group < 1 or head_group < 1:
            raise ValueError(f"mlp_group {mlp_group} and head_group {head_group} must be at least 1")
        shares = dict(zip(STAGE_ORDER, split))
        budgets = stage_budgets(tuple(shares[name] for name in order), target_ratio)  # type: ignore[arg-type]
        paper = stage_stop == "overshoot"
        make = {"blocks": lambda b: Stage("blocks", b, block_candidates(arch, kinds_first=paper)),
                "mlp": lambda b: Stage("mlp width", b, mlp_width_candidates(arch, mlp_group), width_windows),
                "heads": lambda b: Stage("heads", b, head_candidates(arch, head_group), width_windows)}
        stages = [make[name](budget) for name, budget in zip(order, budgets)]
        # A stage with no share is left out, so the last stage with a share is the final one.
        super().__init__(arch, [s for s, name in zip(stages, order) if shares[name] > 0], max_steps, start,
                         stage_stop=stage_stop, stop_ratio=(lambda m: multipruner_ratio(m, arch)) if paper else None)
        self.split, self.mlp_group, self.head_group, self.order = split, mlp_group, head_group, order
        self.width_windows = width_windows
