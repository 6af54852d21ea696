"""Architecture of a decoder-only model, read from its Hugging Face ``config.json`` alone.

Pure Python: a 70B model can be planned from a laptop without its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: model_type values rayprune can prune, with what differs between them.
#: ``qkv_bias``/``o_bias``/``mlp_bias`` are either a fixed bool or the name of the config key.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias"},
    "mistral": {"qkv_bias": False, "o_bias": False, "mlp_bias": False},
    "qwen2": {"qkv_bias": True, "o_bias": False, "mlp_bias": False},
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(sorted(_FAMILIES))


class UnsupportedArchitecture(ValueError):
    """The config describes a model family rayprune cannot prune (yet)."""


@dataclass(frozen=True)
class Arch:
    """What the parameter arithmetic and the masks need to know about a model."""

    family: str  # HF model_type: llama | mistral | qwen2
    num_layers: int
    hidden_size: int
    intermediate_size: int  # MLP width
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (== num_heads without GQA)
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # None: full causal attention everywhere

    @property
    def num_blocks(self) -> int:
        return 2 * self.num_layers

    @property
    def heads_per_unit(self) -> int:
        """Query heads in one head unit: a whole KV group under GQA, else one head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_head_units(self) -> int:
        """Removable attention units per layer (KV groups under GQA, heads otherwise)."""
        return self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Arch:
        """Build from a ``config.json`` dict (or a ``PretrainedConfig.to_dict()``)."""
        family = config.get("model_type")
        if family not in _FAMILIES:
            raise UnsupportedArchitecture(
                f"model_type {family!r} is not supported; rayprune prunes "
                f"{', '.join(SUPPORTED_FAMILIES)}. Pick a model of one of those families."
            )
        spec = _FAMILIES[family]

        def flag(name: str) -> bool:
            value = spec[name]
            return bool(config.get(value, False)) if isinstance(value, str) else value

        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        hidden = int(config["hidden_size"])
        if num_heads % num_kv_heads:
            raise UnsupportedArchitecture(
                f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        window = config.get("sliding_window")
        if family == "qwen2" and not config.get("use_sliding_window", False):
            window = None
        return cls(
            family=family,
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(config.get("head_dim") or hidden // num_heads),
            vocab_size=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=flag("qkv_bias"),
            o_bias=flag("o_bias"),
            mlp_bias=flag("mlp_bias"),
            sliding_window=int(window) if window else None,
        )
