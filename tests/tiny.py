"""Tiny random Llama / Qwen2 / Mistral models (GQA everywhere) for fast, exact tests."""

from __future__ import annotations

import functools

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2"),
    "mistral": dict(model_type="mistral", sliding_window=24),
}
COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)


def tiny_config(family: str):
    from transformers import AutoConfig

    kwargs = {**COMMON, **TINY_CONFIGS[family]}
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


@functools.cache
def _tiny_model_state(family: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    # Random init leaves biases at zero and norms at one: perturb them so they are really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.state_dict()


def tiny_model(family: str):
    """A fresh fp32 eval-mode model (same weights every call)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    model.load_state_dict(_tiny_model_state(family))
    return model.eval()


def tiny_arch(family: str):
    from search_spaces import Arch

    return Arch.from_hf_config(tiny_config(family).to_dict())
