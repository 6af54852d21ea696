"""Evolution with per-layer widths: EvoPress's swaps on width levels, after Týr-the-Pruner (NeurIPS 2025).

Each block has a *level*: how many groups it keeps, ``0`` (the block removed) to ``full / step``,
on the grid of a :class:`~search_spaces.mask_space.MaskSpace` with widths (head units in steps of
``head_group``, MLP channels in steps of ``mlp_group``). A swap moves one level between two layers
of the same kind: one block drops a group, another of its kind takes one back. The levels of a kind
add up to the same total, so the parameter count moves only by the RMSNorm weights of blocks that
reach or leave level 0 (``hidden_size`` each; a removed block takes its norm with it). A mutation is
``min(U[1, s], U[1, s])`` swaps, redrawn until it changes the mask and removes at least
``min_removed`` parameters: the search stays at its ratio to within a few norms and never below it.

Pure Python and seeded, like :mod:`search_spaces.evolution`.
"""

from __future__ import annotations

import random
from typing import Mapping

from .mask import Mask
from .mask_space import Choice, MaskSpace

KINDS = ("attn", "mlp")


def level_pairs(space: MaskSpace, levels: Mapping[str, int], kind: str) -> list[tuple[Choice, Choice]]:
    """Every (giver, taker) of ``kind``: the giver can drop a group, the taker can take one back."""
    choices = [c for c in space.choices if c.kind == kind]
    givers = [c for c in choices if levels[c.name] > 0]
    takers = [c for c in choices if levels[c.name] < c.full]
    return [(g, t) for g in givers for t in takers if g.name != t.name]


def level_swap(space: MaskSpace, levels: Mapping[str, int], kind: str, rng: random.Random) -> dict[str, int]:
    """``levels`` with one group of ``kind`` moved from one layer to another."""
    pairs = level_pairs(space, levels, kind)
    if not pairs:
        raise ValueError(f"no {kind} level to move: every {kind} block is at level 0 or full together")
    giver, taker = rng.choice(pairs)
    out = dict(levels)
    out[giver.name] -= giver.step
    out[taker.name] += taker.step
    return out


def mutate_levels(mask: Mask, space: MaskSpace, rng: random.Random, max_swaps: int, min_removed: int) -> Mask:
    """An offspring of ``mask``: ``min(U[1, max_swaps], U[1, max_swaps])`` level swaps, each of a kind
    drawn with weight its number of possible swaps, that changes the mask and removes at least
    ``min_removed`` parameters (drawn again otherwise)."""
    levels = space.params(mask)
    if levels is None:
        raise ValueError(f"{mask.to_json()} is not on the space's grid of levels (head units by "
                         f"{space.choices[0].step}, MLP channels by {space.choices[1].step})")
    for _ in range(1000):
        swaps = min(rng.randint(1, max_swaps), rng.randint(1, max_swaps))
        child = levels
        for _ in range(swaps):
            weights = {kind: len(level_pairs(space, child, kind)) for kind in KINDS}
            kinds = [kind for kind in KINDS if weights[kind]]
            if not kinds:
                raise ValueError(f"nothing to move in {mask.to_json()}: every block is at level 0 or full, "
                                 f"all of a kind alike")
            child = level_swap(space, child, rng.choices(kinds, [weights[k] for k in kinds])[0], rng)
        if child != levels and space.removal(child) >= min_removed:
            return space.mask(child)
    raise ValueError(f"no mutation of {mask.to_json()} removes at least {min_removed} parameters in 1000 draws")


def movable_levels(space: MaskSpace, mask: Mask) -> int:
    """How many level swaps ``mask`` allows (0: the search has nowhere to go)."""
    levels = space.params(mask)
    return 0 if levels is None else sum(len(level_pairs(space, levels, kind)) for kind in KINDS)


def default_level_generations(space: MaskSpace, mask: Mask) -> int:
    """EvoPress's budget on levels: ``k (n - k) / 1.5`` per kind, with ``k`` groups removed of ``n``."""
    levels = space.params(mask) or {}
    total = 0
    for kind in KINDS:
        choices = [c for c in space.choices if c.kind == kind]
        n = sum(c.full // c.step for c in choices)
        kept = sum(levels.get(c.name, c.full) // c.step for c in choices)
        total += (n - kept) * kept
    return max(1, round(total / 1.5))
