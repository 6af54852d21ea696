"""The space of whole masks a sampler (Optuna) searches, and the ratio band it must stay in.

Pure Python: no optuna here, so the space, the band and the repair are tested in milliseconds.

One *choice* per block: how much of layer ``l``'s attention (head units) or MLP (channels) to
keep, on a grid of levels ``0, step, 2*step, ..., full`` (0 removes the block). Without widths the
grid is ``{0, full}``: keep or remove. A mask is *in the band* when

    target_ratio <= ratio(mask) <= target_ratio + tolerance

(compared with a 1e-12 slack, the ratio of :func:`search_spaces.ratio`). The default tolerance is
the largest single block's share of the parameters: a greedy search stops as soon as it reaches the
target, so it overshoots by less than one block and its mask is always inside the band.

:meth:`MaskSpace.repair` turns any assignment of levels into one inside the band by visiting the
choices in a given order and moving each, where needed, to the nearest level that keeps the band
reachable. It never fails when every step between neighbouring levels is at most the band's width
and removing everything reaches the target; :meth:`MaskSpace.problems` checks both.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from .arch import Arch
from .cost import attn_params, dense_params, mlp_params
from .mask import Block, Mask

SLACK = 1e-12  # ratios are compared with this slack (floating point, not policy)


@dataclass(frozen=True)
class Choice:
    """One block's decision: keep ``value`` units (attn) or channels (mlp), a multiple of ``step``."""

    name: str  # the study's parameter name: attn_<layer> or mlp_<layer>
    kind: Literal["attn", "mlp"]
    layer: int
    step: int
    full: int
    removal: tuple[int, ...]  # parameters removed at each level, aligned with ``levels``

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(range(0, self.full + 1, self.step))

    def removed(self, value: int) -> int:
        return self.removal[value // self.step]


def largest_block_share(arch: Arch) -> float:
    """The parameter share of the largest single block (BlockPruner's largest possible overshoot)."""
    return max(attn_params(arch, arch.num_head_units), mlp_params(arch, arch.intermediate_size)) / dense_params(arch)


class MaskSpace:
    """Per-layer choices of an architecture and the band ``[target, target + tolerance]``.

    ``widths`` adds the levels between 0 and full: head units in steps of ``head_group`` and MLP
    channels in steps of ``mlp_group`` (which must divide the MLP width). Choices are ordered as
    the blocks run: attn_0, mlp_0, attn_1, ...
    """

    def __init__(self, arch: Arch, target_ratio: float, tolerance: float | None = None, *, widths: bool = False,
                 mlp_group: int | None = None, head_group: int = 1) -> None:
        self.arch = arch
        self.dense = dense_params(arch)
        self.target_ratio = target_ratio
        self.tolerance = largest_block_share(arch) if tolerance is None else tolerance
        self.widths = widths
        units, width = arch.num_head_units, arch.intermediate_size
        self._groups = (head_group, mlp_group)
        head_step = head_group if widths and 0 < head_group <= units and units % head_group == 0 else units
        mlp_step = mlp_group if widths and mlp_group and 0 < mlp_group <= width and width % mlp_group == 0 else width
        full_attn, full_mlp = attn_params(arch, units), mlp_params(arch, width)
        choices = []
        for layer in range(arch.num_layers):
            choices.append(Choice(f"attn_{layer}", "attn", layer, head_step, units,
                                  tuple(full_attn - attn_params(arch, v) for v in range(0, units + 1, head_step))))
            choices.append(Choice(f"mlp_{layer}", "mlp", layer, mlp_step, width,
                                  tuple(full_mlp - mlp_params(arch, v) for v in range(0, width + 1, mlp_step))))
        self.choices: tuple[Choice, ...] = tuple(choices)
        self._by_name = {c.name: c for c in self.choices}

    # ---- the band -------------------------------------------------------------------------------
    @property
    def band(self) -> tuple[float, float]:
        return (self.target_ratio, self.target_ratio + self.tolerance)

    def _below_top(self, removed: int) -> bool:
        return removed / self.dense <= self.band[1] + SLACK

    def _reaches_floor(self, removed: int) -> bool:
        return removed / self.dense >= self.band[0] - SLACK

    def in_band(self, removed: int) -> bool:
        """Whether removing ``removed`` parameters lands inside the band."""
        return self._reaches_floor(removed) and self._below_top(removed)

    def contains(self, mask: Mask) -> bool:
        """Whether ``mask`` is a point of this space (on the level grid) inside the band."""
        params = self.params(mask)
        return params is not None and self.in_band(self.removal(params))

    # ---- masks <-> parameters -------------------------------------------------------------------
    def mask(self, params: Mapping[str, int]) -> Mask:
        """The mask of an assignment (every choice named; values on the grid)."""
        mask = Mask()
        for c in self.choices:
            value = int(params[c.name])
            if value == 0:
                mask = mask.remove(Block(c.layer, c.kind))
            elif value != c.full:
                mask = mask.with_heads(c.layer, value) if c.kind == "attn" else mask.with_mlp_width(c.layer, value)
        return mask

    def params(self, mask: Mask) -> dict[str, int] | None:
        """The assignment of ``mask``, or None when it is not on this space's grid."""
        out = {}
        for c in self.choices:
            kept = mask.heads_kept(c.layer, c.full) if c.kind == "attn" else mask.mlp_kept(c.layer, c.full)
            if kept % c.step or kept > c.full:
                return None
            out[c.name] = kept
        return out if self.mask(out) == mask else None

    def removal(self, params: Mapping[str, int]) -> int:
        """Parameters removed by an assignment (exact: removal is additive over blocks)."""
        return sum(c.removed(int(params[c.name])) for c in self.choices)

    # ---- repair ---------------------------------------------------------------------------------
    def repair(self, proposed: Mapping[str, int], order: Sequence[str]) -> dict[str, int]:
        """An assignment inside the band, as close to ``proposed`` as a sequential pass allows.

        Choices are visited in ``order`` (every choice exactly once). Each keeps its proposed level
        (snapped to the grid) unless that would pass the top of the band, or leave the floor out of
        reach of the choices not visited yet; then it takes the nearest level that does neither
        (ties: keep more). Deterministic; an assignment already inside the band comes back unchanged
        (no prefix of it passes the top, and what follows can still reach the floor).
        """
        if sorted(order) != sorted(self._by_name):
            raise ValueError("repair order must name every choice of the space exactly once")
        reachable = sum(c.removal[0] for c in self.choices)  # still removable by choices not visited
        removed, out = 0, {}
        for name in order:
            c = self._by_name[name]
            reachable -= c.removal[0]
            want = min(c.levels, key=lambda v: (abs(v - int(proposed[name])), -v))
            fine = [v for v in c.levels
                    if self._below_top(removed + c.removed(v)) and self._reaches_floor(removed + c.removed(v) + reachable)]
            if not fine:
                raise ValueError(f"no level of {name} keeps the ratio band {self.band} reachable; "
                                 f"{'; '.join(self.problems()) or 'widen search.ratio_tolerance'}")
            out[name] = min(fine, key=lambda v: (abs(v - want), -v))
            removed += c.removed(out[name])
        return {c.name: out[c.name] for c in self.choices}

    def repair_order(self, proposed: Mapping[str, int], harm: Mapping[str, float], tiebreak: Sequence[str]) -> list[str]:
        """The order in which :meth:`repair` should visit the choices, by a prior: ``harm`` (choice
        name -> how much removing it alone hurts, e.g. its single-removal perplexity; missing or NaN:
        unknown, ranked between the known ones by ``tiebreak``'s order).

        Repair adjusts the choices it visits last. A proposal that removes too much is brought down
        by restoring the most harmful removals: they are visited last. One that removes too little is
        brought up by removing the least harmful blocks: they are visited last. A proposal already in
        the band is visited in any order (repair changes nothing)."""
        removed = self.removal({c.name: self._snap(c, proposed[c.name]) for c in self.choices})
        known = sorted(v for v in harm.values() if math.isfinite(v))
        middle = known[len(known) // 2] if known else 0.0
        rank = {name: i for i, name in enumerate(tiebreak)}

        def key(name: str) -> tuple[float, int]:
            value = harm.get(name, math.nan)
            return (value if math.isfinite(value) else middle), rank.get(name, 0)

        order = sorted((c.name for c in self.choices), key=key)  # least harmful first
        return order if not self._below_top(removed) else order[::-1]

    @staticmethod
    def _snap(c: Choice, value: int) -> int:
        return min(c.levels, key=lambda v: (abs(v - int(value)), -v))

    def largest_step(self) -> int:
        """Parameters of the largest change between neighbouring levels of any choice."""
        return max(max(a - b for a, b in zip(c.removal, c.removal[1:])) for c in self.choices)

    def problems(self) -> list[str]:
        """Why the band cannot always be met (empty: :meth:`repair` never fails), each with its fix."""
        out = self.group_problems()
        most = sum(c.removal[0] for c in self.choices) / self.dense
        if most < self.target_ratio:
            out.append(f"search.target_ratio {self.target_ratio:g} cannot be reached: removing every block removes "
                       f"{most:.4f} of the parameters (embeddings stay); lower search.target_ratio")
        step = self.largest_step() / self.dense
        if step > self.tolerance + SLACK:
            out.append(f"search.ratio_tolerance {self.tolerance:g} is narrower than the largest single change of "
                       f"the space ({step:.4f} of the parameters), so the band could be jumped over; use "
                       f"search.ratio_tolerance={step:.4f} or more (or null: {largest_block_share(self.arch):.4f})")
        return out

    def group_problems(self) -> list[str]:
        """Group sizes that do not divide a layer's width (with widths), each with its fix."""
        out: list[str] = []
        head_group, mlp_group = self._groups
        units, width = self.arch.num_head_units, self.arch.intermediate_size
        if self.widths and (head_group < 1 or units % head_group):
            out.append(f"search.head_group {head_group} does not divide the {units} head units of a layer; "
                       f"use a divisor of {units}, e.g. search.head_group=1")
        if self.widths and (not mlp_group or mlp_group < 1 or width % mlp_group):
            out.append(f"search.mlp_group {mlp_group} does not divide the MLP width {width}; use a divisor, "
                       f"e.g. search.mlp_group={width // 6 if width % 6 == 0 else 1}")
        return out

def check_optuna(arch: Arch, target_ratio: float, tolerance: float | None, *, widths: bool, mlp_group: int,
                 head_group: int, warm_start: str) -> list[str]:
    """Every problem with an Optuna setting, each naming the fix (empty: fine).

    Beyond :meth:`MaskSpace.problems`: with a BlockPruner warm start the band must hold the greedy
    mask, which overshoots the target by up to one block.
    """
    space = MaskSpace(arch, target_ratio, tolerance, widths=widths, mlp_group=mlp_group, head_group=head_group)
    problems = space.problems()
    block = largest_block_share(arch)
    if warm_start == "blockpruner" and space.tolerance + SLACK < block:
        problems.append(f"search.ratio_tolerance {space.tolerance:g} may leave BlockPruner's mask (the warm start) "
                        f"outside the band: it overshoots the target by up to one block ({block:.4f}); use "
                        f"search.ratio_tolerance=null (that block's share) or search.warm_start=none")
    return problems
