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


# ---- one-time importance reordering (MultiPruner) -----------------------------------------------
def _permute_rows_(linear: nn.Linear, order: torch.Tensor) -> None:
    linear.weight.data = linear.weight.data[order].contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data[order].contiguous()


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


@torch.no_grad()
def reorder_by_l1_(model: PreTrainedModel, arch: Arch) -> PreTrainedModel:
    """Sort MLP channels and head units by L1 importance, in place; the function is unchanged.

    MLP channel j scores |gate_j|_1 + |up_j|_1; down_proj columns follow. A head unit (a KV group
    under GQA) scores the L1 norm of its q, k and v rows; o_proj columns follow. Afterwards "keep
    width w" means "keep the first w". Data-free and deterministic (stable sort), so a replica and
    an export reorder identically.
    """
    hd, g = arch.head_dim, arch.heads_per_unit
    for module in model.model.layers:
        mlp = getattr(module, "mlp", None)
        if isinstance(getattr(mlp, "gate_proj", None), nn.Linear):
            order = _descending(mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1))
            _permute_rows_(mlp.gate_proj, order)
            _permute_rows_(mlp.up_proj, order)
            mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, order].contiguous()
        attn = getattr(module, "self_attn", None)
        if isinstance(getattr(attn, "q_proj", None), nn.Linear):
            units = attn.k_proj.weight.shape[0] // hd
            q = attn.q_proj.weight.abs().view(units, g * hd, -1).sum((1, 2))  # (units,)
            k = attn.k_proj.weight.abs().view(units, hd, -1).sum((1, 2))
            v = attn.v_proj.weight.abs().view(units, hd, -1).sum((1, 2))
            unit_order = _descending(q + k + v)  # (units,), on the layer's device
            # Index tensors live where the indexed weights do (a replica over k GPUs): the aranges too.
            device = unit_order.device
            q_rows = (unit_order[:, None] * g * hd + torch.arange(g * hd, device=device)).reshape(-1)
            kv_rows = (unit_order[:, None] * hd + torch.arange(hd, device=device)).reshape(-1)
            _permute_rows_(attn.q_proj, q_rows)
            _permute_rows_(attn.k_proj, kv_rows)
            _permute_rows_(attn.v_proj, kv_rows)
            attn.o_proj.weight.data = attn.o_proj.weight.data[:, q_rows].contiguous()
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
