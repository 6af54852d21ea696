"""Exact parameter counts of masked models.

Convention: a removed block takes its RMSNorm weight with it (the compact export deletes it), so
our kept count is lower than MultiPruner's published figures by exactly ``hidden_size`` per removed
block; ``param_count(..., count_removed_norms=True)`` reproduces their convention.
Embeddings and the LM head are included; tied embeddings are counted once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arch import Arch
    from .mask import Mask


def attn_params(arch: Arch, units: int) -> int:
    """One attention block keeping ``units`` head units, its input norm included."""
    if units == 0:
        return 0
    q_heads, kv_heads = units * arch.heads_per_unit, units
    q_out, kv_out = q_heads * arch.head_dim, kv_heads * arch.head_dim
    weights = arch.hidden_size * (q_out + 2 * kv_out) + q_out * arch.hidden_size
    biases = (q_out + 2 * kv_out if arch.qkv_bias else 0) + (arch.hidden_size if arch.o_bias else 0)
    return weights + biases + arch.hidden_size


def mlp_params(arch: Arch, width: int) -> int:
    """One MLP block keeping ``width`` channels, its post-attention norm included."""
    if width == 0:
        return 0
    biases = 2 * width + arch.hidden_size if arch.mlp_bias else 0
    return 3 * arch.hidden_size * width + biases + arch.hidden_size


def embedding_params(arch: Arch) -> int:
    """Token embeddings, LM head (once if tied) and the final norm."""
    head = 0 if arch.tie_embeddings else arch.vocab_size * arch.hidden_size
    return arch.vocab_size * arch.hidden_size + head + arch.hidden_size


def dense_params(arch: Arch) -> int:
    per_layer = attn_params(arch, arch.num_head_units) + mlp_params(arch, arch.intermediate_size)
    return embedding_params(arch) + arch.num_layers * per_layer


def param_count(mask: Mask, arch: Arch, *, count_removed_norms: bool = False) -> int:
    """Parameters of the model that ``mask`` leaves."""
    total = embedding_params(arch)
    for layer in range(arch.num_layers):
        total += attn_params(arch, mask.heads_kept(layer, arch.num_head_units))
        total += mlp_params(arch, mask.mlp_kept(layer, arch.intermediate_size))
    if count_removed_norms:
        total += arch.hidden_size * (len(mask.attn_removed) + len(mask.mlp_removed))
    return total


def ratio(mask: Mask, arch: Arch) -> float:
    """Removed parameters / dense parameters (the figure BlockPruner and MultiPruner report)."""
    dense = dense_params(arch)
    return (dense - param_count(mask, arch)) / dense
