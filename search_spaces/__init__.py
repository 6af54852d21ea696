"""Pure descriptions of what can be pruned: architectures, masks, parameter arithmetic.

Imports nothing of torch or ray, so ``import search_spaces`` is instant and a campaign can be
planned from a laptop.
"""

from __future__ import annotations

from .arch import SUPPORTED_FAMILIES, Arch, UnsupportedArchitecture
from .cost import dense_params, param_count, ratio
from .mask import KINDS, Block, Mask, mask_key
from .scores import perplexity, rank_value

__all__ = [
    "KINDS",
    "SUPPORTED_FAMILIES",
    "Arch",
    "Block",
    "Mask",
    "UnsupportedArchitecture",
    "dense_params",
    "mask_key",
    "param_count",
    "perplexity",
    "rank_value",
    "ratio",
]
