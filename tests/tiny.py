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


def reorder_by_l1_(model, arch):
    """``model`` in the L1 order of its own weights (float64, as ``actors.permutation`` computes a
    checkpoint's), in place: what an evaluator does to a replica loaded from a saved ``model``."""
    from actors.permutation import apply_permutation_, state_permutation

    return apply_permutation_(model, arch, state_permutation(model.state_dict(), arch))


def tiny_arch(family: str):
    from search_spaces import Arch

    return Arch.from_hf_config(tiny_config(family).to_dict())


def char_tokenizer():
    """A character-level fast tokenizer whose 97 ids fit the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def save_tiny(family: str, directory) -> str:
    """A complete local Hugging Face directory (safetensors + tokenizer) of a tiny model."""
    tiny_model(family).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return str(directory)


def write_corpus(path, words: int = 6000, seed: int = 0) -> str:
    """A deterministic text file of pseudo-words, split into lines (documents)."""
    import random

    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do"]
    lines, line = [], []
    for _ in range(words):
        line.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))))
        if len(line) >= 12:
            lines.append(" ".join(line) + ".")
            line = []
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_run_setup(root) -> dict:
    """A tiny Llama saved as a model directory and a corpus file under ``root``, for campaign tests."""
    from pathlib import Path

    root = Path(root)
    return {"model": save_tiny("llama", root / "model"), "corpus": write_corpus(root / "corpus.txt"), "root": root}


#: Small, fast campaign settings on the tiny model: 4 x 24 calibration and 3 x 32 held-out tokens.
TINY_CAMPAIGN = {
    "data.calibration": "{sequences: 4, length: 24, seed: 0}",
    "data.evaluation": "{sequences: 3, length: 32, seed: 1}",
    "search.batch_size": 2, "cluster.actors": 2,
}


def tiny_overrides(setup: dict, name: str, **overrides) -> list[str]:
    """``KEY=VALUE`` overrides of a campaign named ``name`` on ``setup`` (see ``tiny_run_setup``),
    in ``setup["root"] / name``; ``overrides`` (dotted keys) win over ``TINY_CAMPAIGN``."""
    values = {"name": name, "model": setup["model"], "data.corpus": setup["corpus"], **TINY_CAMPAIGN,
              "output": str(setup["root"] / name), **overrides}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_campaign_config(setup: dict, name: str, **overrides):
    """The validated config of ``tiny_overrides(setup, name, **overrides)``."""
    from orchestrator.config_load import load_config

    return load_config(None, tiny_overrides(setup, name, **overrides))
