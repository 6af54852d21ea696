"""Physical model surgery: make a stock Hugging Face model really smaller.

``prune_model_`` deletes removed blocks (their norm and projections are gone, the residual stream
passes through) and slices narrowed projections to their first rows/columns. The result is what the
compact export saves and what the masked evaluation must equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from search_spaces import Arch, Mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class RemovedAttention(nn.Module):
    """Stands where a removed attention block was: adds nothing to the residual stream.

    It still writes a one-element-per-token placeholder to the KV cache, because ``generate()``
    reads the number of tokens seen so far from the cache of layer 0.
    """

    def __init__(self, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            B, T, _ = hidden_states.shape
            placeholder = hidden_states.new_zeros(B, 1, T, 1)  # (B, 1 head, T, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """Stands where a removed MLP block was: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _slice_linear_(linear: nn.Linear, *, out: int | None = None, inp: int | None = None) -> None:
    """Keep the first ``out`` rows and/or ``inp`` columns of ``linear``, as new (smaller) storage."""
    weight = linear.weight.data
    if out is not None:
        weight = weight[:out]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[:out].clone(), requires_grad=False)
        linear.out_features = out
    if inp is not None:
        weight = weight[:, :inp]
        linear.in_features = inp
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)


def narrow_attention_(attn: nn.Module, arch: Arch, units: int) -> None:
    """Keep the first ``units`` head units (KV groups under GQA) of an attention module."""
    q_out = units * arch.heads_per_unit * arch.head_dim
    kv_out = units * arch.head_dim
    _slice_linear_(attn.q_proj, out=q_out)
    _slice_linear_(attn.k_proj, out=kv_out)
    _slice_linear_(attn.v_proj, out=kv_out)
    _slice_linear_(attn.o_proj, inp=q_out)
    # The stock forward reshapes with -1 heads and keeps num_key_value_groups: both stay right.


def narrow_mlp_(mlp: nn.Module, width: int) -> None:
    """Keep the first ``width`` channels of an MLP module."""
    _slice_linear_(mlp.gate_proj, out=width)
    _slice_linear_(mlp.up_proj, out=width)
    _slice_linear_(mlp.down_proj, inp=width)
    mlp.intermediate_size = width


def prune_model_(model: PreTrainedModel, mask: Mask, arch: Arch) -> PreTrainedModel:
    """Apply ``mask`` to ``model`` in place, physically. Returns ``model`` for chaining."""
    for layer, module in enumerate(model.model.layers):
        units = mask.heads_kept(layer, arch.num_head_units)
        if units == 0:
            module.self_attn = RemovedAttention(layer)
            module.input_layernorm = nn.Identity()
        elif units < arch.num_head_units:
            narrow_attention_(module.self_attn, arch, units)
        width = mask.mlp_kept(layer, arch.intermediate_size)
        if width == 0:
            module.mlp = RemovedMLP()
            module.post_attention_layernorm = nn.Identity()
        elif width < arch.intermediate_size:
            narrow_mlp_(module.mlp, width)
    return model


def count_parameters(model: nn.Module) -> int:
    """Parameters of a live model, shared (tied) tensors counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
