"""The naive reference: the stock Hugging Face forward with a mask applied in place, one full
forward (with ``labels=``) per mask. This is what the papers' code does; benchmarks keep it as the
baseline and tests use it as an independent oracle."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from search_spaces import Arch, Mask

from .surgery import RemovedAttention, RemovedMLP

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _view(linear: nn.Linear, name: str, index) -> tuple[nn.Linear, str, nn.Parameter | None]:
    old = getattr(linear, name)
    if old is not None:
        setattr(linear, name, nn.Parameter(old.data[index], requires_grad=False))  # a view: no copy
    return linear, name, old


@contextmanager
def stock_masked(model: PreTrainedModel, mask: Mask, arch: Arch) -> Iterator[PreTrainedModel]:
    """Apply ``mask`` to ``model`` without copying weights; everything is restored on exit."""
    swapped: list[tuple[nn.Module, str, object]] = []
    try:
        for layer, module in enumerate(model.model.layers):
            units = mask.heads_kept(layer, arch.num_head_units)
            if units == 0:
                swapped.append((module, "self_attn", module.self_attn))
                module.self_attn = RemovedAttention()
            elif units < arch.num_head_units:
                q_out, kv_out = units * arch.heads_per_unit * arch.head_dim, units * arch.head_dim
                attn = module.self_attn
                for lin, n in ((attn.q_proj, q_out), (attn.k_proj, kv_out), (attn.v_proj, kv_out)):
                    swapped += [_view(lin, "weight", slice(0, n)), _view(lin, "bias", slice(0, n))]
                swapped.append(_view(attn.o_proj, "weight", (slice(None), slice(0, q_out))))
            width = mask.mlp_kept(layer, arch.intermediate_size)
            if width == 0:
                swapped.append((module, "mlp", module.mlp))
                module.mlp = RemovedMLP()
            elif width < arch.intermediate_size:
                mlp = module.mlp
                for lin in (mlp.gate_proj, mlp.up_proj):
                    swapped += [_view(lin, "weight", slice(0, width)), _view(lin, "bias", slice(0, width))]
                swapped.append(_view(mlp.down_proj, "weight", (slice(None), slice(0, width))))
        yield model
    finally:
        for owner, name, old in reversed(swapped):
            setattr(owner, name, old)


def stock_nll(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """Summed NLL and predicted-token count of the stock forward with ``labels=``."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size]
            n = batch.shape[0] * (batch.shape[1] - 1)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss.item()
            total += loss * n if math.isfinite(loss) else loss
            tokens += n
    return total, tokens
