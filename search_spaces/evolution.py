"""EvoPress's mutation on rayprune's block masks (Sieberling et al., ICML 2025; IST-DASLab/EvoPress).

A mask that removes ``a`` attention and ``m`` MLP blocks is mutated by *swaps*: a removed block is
restored and a kept block of the same kind is removed. Every block of a kind has the same size, so a
swap keeps the parameter count exact: the whole search moves on one ratio. The number of swaps of
one mutation is ``min(U[1, s], U[1, s])`` (EvoPress's ``scripts/run_drop_search.sh``, ``s = 3``):
mostly one, rarely ``s``.

Pure Python: a seeded ``random.Random`` makes every offspring a function of the seed and the scores
seen, so a rerun against the cache proposes the same generations.
"""

from __future__ import annotations

import random

from .mask import Mask

#: The repository's settings (scripts/run_drop_search.sh), for 131,072 calibration tokens.
EVOPRESS_OFFSPRING = 32
EVOPRESS_MAX_SWAPS = 3
EVOPRESS_CALIBRATION_TOKENS = 131_072
EVOPRESS_FIRST_TOKENS = 2_048  # selection's first step: every offspring on this many tokens


def default_first_windows(n_windows: int, batch_size: int = 1) -> int | None:
    """EvoPress's first selection step scaled to a calibration set of ``n_windows`` windows: the same
    share of it (2,048 of 131,072 tokens, 1/64), at least one batch. None where that is the whole
    set (one step on every window)."""
    if n_windows < 1 or batch_size < 1:
        raise ValueError(f"need n_windows >= 1 and batch_size >= 1; got {n_windows}, {batch_size}")
    share = -(-n_windows * EVOPRESS_FIRST_TOKENS // EVOPRESS_CALIBRATION_TOKENS)  # ceil
    return first_step_windows(share, n_windows, batch_size)


def first_step_windows(first: int, n_windows: int, batch_size: int) -> int | None:
    """A first selection step of ``first`` windows as the scorer cuts it: whole batches, rounded up.
    None where that is the whole set (one step on every window)."""
    first = -(-first // batch_size) * batch_size
    return first if first < n_windows else None


def swappable(mask: Mask, num_layers: int) -> list[str]:
    """Kinds (``attn``, ``mlp``) with a removed and a kept block: those a swap can change."""
    removed = {"attn": len(mask.attn_removed), "mlp": len(mask.mlp_removed)}
    return [kind for kind, n in removed.items() if 0 < n < num_layers]


def swap(mask: Mask, num_layers: int, kind: str, rng: random.Random) -> Mask:
    """``mask`` with one removed block of ``kind`` restored and one kept block of ``kind`` removed."""
    removed = set(mask.attn_removed if kind == "attn" else mask.mlp_removed)
    kept = [layer for layer in range(num_layers) if layer not in removed]
    if not removed or not kept:
        raise ValueError(f"no {kind} block to swap in {mask.to_json()}: it removes {len(removed)} of {num_layers}")
    restore, remove = rng.choice(sorted(removed)), rng.choice(kept)
    removed = (removed - {restore}) | {remove}
    if kind == "attn":
        return Mask(attn_removed=frozenset(removed), mlp_removed=mask.mlp_removed)
    return Mask(attn_removed=mask.attn_removed, mlp_removed=frozenset(removed))


def mutate(mask: Mask, num_layers: int, rng: random.Random, max_swaps: int = EVOPRESS_MAX_SWAPS) -> Mask:
    """An offspring of ``mask``: ``min(U[1, max_swaps], U[1, max_swaps])`` swaps, each of a kind drawn
    from those that can swap (weighted by their number of possible swaps). Never returns ``mask``
    itself when a swap is possible (a swap that undoes another is drawn again)."""
    if mask.mlp_width or mask.head_units:
        raise ValueError("evolution on blocks mutates masks without widths; this mask narrows layers")
    kinds = swappable(mask, num_layers)
    if not kinds:
        raise ValueError(f"nothing to swap in {mask.to_json()}: every kind is fully kept or fully removed")
    weights = [len(_removed(mask, k)) * (num_layers - len(_removed(mask, k))) for k in kinds]
    swaps = min(rng.randint(1, max_swaps), rng.randint(1, max_swaps))
    child = mask
    while child == mask:
        child = mask
        for _ in range(swaps):
            child = swap(child, num_layers, rng.choices(kinds, weights)[0], rng)
    return child


def default_generations(mask: Mask, num_layers: int) -> int:
    """EvoPress's budget, ``k (n - k) / 1.5`` per kind (k removed of n), summed over the kinds."""
    total = sum(len(_removed(mask, k)) * (num_layers - len(_removed(mask, k))) for k in ("attn", "mlp"))
    return max(1, round(total / 1.5))


def _removed(mask: Mask, kind: str) -> frozenset[int]:
    return frozenset(mask.attn_removed if kind == "attn" else mask.mlp_removed)
