"""A lean, masked forward pass over a Hugging Face decoder's own weights.

``LeanDecoder`` runs any :class:`~search_spaces.Mask` on a dense Llama/Qwen2/Mistral model without
copying a weight: removed blocks are skipped (the residual stream passes through untouched), narrowed
blocks use views of the first rows/columns of their projections. It is lean where the stock forward
is not: no cache objects, no attention-mask tensors (causal attention is implied), and the loss is
computed in token chunks so the full ``(tokens, vocab)`` logits never exist at once.

Every function here is exact with respect to the physically pruned model (see ``surgery.py``): the
tests compare logits within 1e-5 in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from search_spaces import Arch, Block, Mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Tokens per chunk of the LM head + cross-entropy: bounds the logits buffer to chunk x vocab floats.
LOSS_CHUNK_TOKENS = 512


class LeanDecoder:
    """Masked forward over the weights of ``model`` (which is never modified)."""

    def __init__(self, model: PreTrainedModel, arch: Arch) -> None:
        self.arch = arch
        self.model = model
        self.embed_tokens = model.model.embed_tokens
        self.layers = model.model.layers
        self.final_norm = model.model.norm
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self.windows = layer_windows(model.config, arch)  # per layer: sliding window or None (full causal)
        self._rope: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- pieces -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (B, T, H)

    def rope(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..T-1, cached per length: every window starts at position 0."""
        key = (h.shape[1], h.device, h.dtype)
        if key not in self._rope:
            positions = torch.arange(h.shape[1], device=h.device)[None]  # (1, T)
            self._rope[key] = self.rotary(h, positions)  # 2 x (1, T, hd)
        return self._rope[key]

    def attention(self, layer: int, h: torch.Tensor, units: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Attention block keeping the first ``units`` head units; returns the new residual stream."""
        arch, module = self.arch, self.layers[layer]
        attn = module.self_attn
        B, T, _ = h.shape
        q_out = units * arch.heads_per_unit * arch.head_dim
        kv_out = units * arch.head_dim
        h = h.to(attn.q_proj.weight.device)  # a replica over k GPUs: follow the layer (no-op on one device)
        cos, sin = (t.to(h.device) for t in rope)
        x = module.input_layernorm(h)  # (B, T, H)
        q = F.linear(x, attn.q_proj.weight[:q_out], _rows(attn.q_proj.bias, q_out))
        k = F.linear(x, attn.k_proj.weight[:kv_out], _rows(attn.k_proj.bias, kv_out))
        v = F.linear(x, attn.v_proj.weight[:kv_out], _rows(attn.v_proj.bias, kv_out))
        q = q.view(B, T, -1, arch.head_dim).transpose(1, 2)  # (B, nq, T, hd)
        k = k.view(B, T, -1, arch.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, -1, arch.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        window = self.windows[layer]
        if window is not None and T > window:
            i = torch.arange(T, device=h.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)  # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=attn.scaling, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, q_out)  # (B, T, nq*hd)
        return h + F.linear(y, attn.o_proj.weight[:, :q_out], attn.o_proj.bias)

    def mlp(self, layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
        """MLP block keeping the first ``width`` channels; returns the new residual stream."""
        module = self.layers[layer]
        mlp = module.mlp
        h = h.to(mlp.gate_proj.weight.device)
        x = module.post_attention_layernorm(h)  # (B, T, H)
        gate = F.linear(x, mlp.gate_proj.weight[:width], _rows(mlp.gate_proj.bias, width))  # (B, T, w)
        up = F.linear(x, mlp.up_proj.weight[:width], _rows(mlp.up_proj.bias, width))  # (B, T, w)
        return h + F.linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :width], mlp.down_proj.bias)

    def block(self, index: int, h: torch.Tensor, mask: Mask, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Run block ``index`` of the masked model (identity when removed)."""
        block = Block.from_index(index)
        if block.kind == "attn":
            units = mask.heads_kept(block.layer, self.arch.num_head_units)
            return self.attention(block.layer, h, units, rope) if units else h
        width = mask.mlp_kept(block.layer, self.arch.intermediate_size)
        return self.mlp(block.layer, h, width) if width else h

    def run(self, h: torch.Tensor, mask: Mask, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks ``start..stop-1`` of the masked model on the residual stream ``h``."""
        rope = self.rope(h)
        for index in range(start, self.arch.num_blocks if stop is None else stop):
            h = self.block(index, h, mask, rope)
        return h

    # ---- outputs ----------------------------------------------------------------------------------
    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(h.to(self.lm_head.weight.device)))  # (B, T, V)

    def nll(self, h: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL (float64) and the number of predicted tokens.

        Token ``t+1`` is predicted from position ``t``; the head and the loss run over chunks of
        ``LOSS_CHUNK_TOKENS`` tokens.
        """
        h = h.to(self.lm_head.weight.device)
        x = self.final_norm(h[:, :-1]).reshape(-1, h.shape[-1])  # (B*(T-1), H)
        labels = input_ids[:, 1:].reshape(-1).to(h.device)  # (B*(T-1),)
        total = 0.0
        for start in range(0, x.shape[0], LOSS_CHUNK_TOKENS):
            logits = self.lm_head(x[start : start + LOSS_CHUNK_TOKENS]).float()  # (chunk, V)
            total += F.cross_entropy(logits, labels[start : start + LOSS_CHUNK_TOKENS], reduction="sum").item()
        return total, int(labels.numel())

    def forward_logits(self, input_ids: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Full masked forward to logits (tests and export checks; the search uses ``nll``)."""
        return self.logits(self.run(self.embed(input_ids), mask))


def layer_windows(config: object, arch: Arch) -> list[int | None]:
    """The attention window of each layer, as transformers applies it.

    Mistral: ``sliding_window`` on every layer. Qwen2: only on layers whose ``config.layer_types``
    entry is ``sliding_attention``; transformers derives that list from ``use_sliding_window`` and
    ``max_window_layers`` (layers at or past it slide), unless the config spells it out. Without a
    window (``arch.sliding_window`` None, e.g. Qwen2 with ``use_sliding_window`` off): None everywhere.
    """
    window = arch.sliding_window
    if window is None:
        return [None] * arch.num_layers
    if arch.family != "qwen2":
        return [window] * arch.num_layers
    types = getattr(config, "layer_types", None)
    if types is None:  # a config object without the derived list: transformers' own rule
        first = int(getattr(config, "max_window_layers", 0))
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(arch.num_layers)]
    if len(types) != arch.num_layers:
        raise ValueError(f"config.layer_types has {len(types)} entries for {arch.num_layers} layers; "
                         f"fix the model's config.json (or drop layer_types to derive it from max_window_layers)")
    return [window if kind == "sliding_attention" else None for kind in types]


def _rows(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if bias is None else bias[:n]
