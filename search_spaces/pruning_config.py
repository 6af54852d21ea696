"""MultiPruner's ``pruning_config.json`` format, read and written.

```json
{"pruned_attn_idx": [25, 27, 24], "pruned_mlp_idx": [8],
 "pruned_attn_width": {"1": 3328}, "pruned_mlp_width": {"2": 5888}}
```
Widths are kept channels: for attention, kept query heads x head_dim (whole head units only).
"""

from __future__ import annotations

from typing import Any, Mapping

from .arch import Arch
from .mask import Mask

KEYS = ("pruned_attn_idx", "pruned_mlp_idx", "pruned_attn_width", "pruned_mlp_width")


def mask_to_pruning_config(mask: Mask, arch: Arch) -> dict[str, Any]:
    unit_channels = arch.heads_per_unit * arch.head_dim
    return {
        "pruned_attn_idx": sorted(mask.attn_removed),
        "pruned_mlp_idx": sorted(mask.mlp_removed),
        "pruned_attn_width": {str(l): u * unit_channels for l, u in mask.head_units},
        "pruned_mlp_width": {str(l): w for l, w in mask.mlp_width},
    }


def mask_from_pruning_config(data: Mapping[str, Any], arch: Arch) -> Mask:
    """Parse and check a pruning config against ``arch``; one ValueError lists every problem."""
    problems = [f"unknown key {k!r} (expected {', '.join(KEYS)})" for k in data if k not in KEYS]
    unit_channels = arch.heads_per_unit * arch.head_dim
    layers = range(arch.num_layers)
    for key in ("pruned_attn_idx", "pruned_mlp_idx"):
        problems += [f"{key}: layer {i} is outside 0..{arch.num_layers - 1}" for i in data.get(key, []) if i not in layers]
    head_units: dict[int, int] = {}
    for layer, width in data.get("pruned_attn_width", {}).items():
        if int(layer) not in layers or width % unit_channels or not 0 < width <= arch.num_heads * arch.head_dim:
            problems.append(f"pruned_attn_width[{layer}]={width}: needs a layer in range and a multiple of "
                            f"{unit_channels} (one head unit) up to {arch.num_heads * arch.head_dim}")
        else:
            head_units[int(layer)] = width // unit_channels
    mlp_width: dict[int, int] = {}
    for layer, width in data.get("pruned_mlp_width", {}).items():
        if int(layer) not in layers or not 0 < width <= arch.intermediate_size:
            problems.append(f"pruned_mlp_width[{layer}]={width}: needs a layer in range and 1..{arch.intermediate_size}")
        else:
            mlp_width[int(layer)] = width
    if problems:
        raise ValueError("invalid pruning config:\n  " + "\n  ".join(problems))
    mask = Mask(frozenset(data.get("pruned_attn_idx", [])), frozenset(data.get("pruned_mlp_idx", [])))
    for layer, units in head_units.items():
        if units < arch.num_head_units and layer not in mask.attn_removed:
            mask = mask.with_heads(layer, units)
    for layer, width in mlp_width.items():
        if width < arch.intermediate_size and layer not in mask.mlp_removed:
            mask = mask.with_mlp_width(layer, width)
    return mask
