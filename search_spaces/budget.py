"""MultiPruner's budget split and granularities: the recipes its repository publishes, and its
stopping arithmetic.

The split ``a:b:c`` of a target ratio ``T`` gives cumulative stage budgets: blocks up to ``a*T``,
MLP channel groups up to ``(a+b)*T``, head units up to ``T``. MultiPruner's loop
(``run_multipruner.py``) runs each stage ``while ratio < budget`` with its own parameter count, in
which a removed block's norm weight stays counted (:func:`multipruner_ratio`).

An MLP group of ``G`` channels need not divide the width ``w``: MultiPruner proposes a step in a
layer while ``w - G > 0``, so a layer can end at the remainder (11008 = 10 x 1024 + 768, so
Llama-2-7B's widths run 11008, 9984, ..., 1792, 768).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .arch import Arch
from .cost import dense_params, param_count

if TYPE_CHECKING:
    from .mask import Mask

#: Where the published recipes come from (IntelLabs/Hardware-Aware-Automated-Machine-Learning).
SOURCE = "MultiPruner/results/README.md (run commands) and MultiPruner/README.md"


@dataclass(frozen=True)
class MultiPrunerDefaults:
    split: tuple[float, float, float]
    mlp_group: int  # channels removed per stage-2 step (MultiPruner's group: it need not divide the width)
    head_group: int  # head units removed per stage-3 step
    why: str  # where the setting comes from


@dataclass(frozen=True)
class Recipe:
    """One published run command: the model's shape and ``--pruning_distribution``,
    ``--mlp_channel_group_size``, ``--attn_channel_group_size`` (channels of query heads)."""

    model: str
    family: str
    shape: tuple[int, int, int, int, int, int]  # layers, hidden, MLP width, heads, KV heads, vocab
    split: tuple[float, float, float]
    mlp_group: int
    attn_channels: int
    # what tells Llama-3.1 from Llama-3 (equal shapes): rope_scaling's type "llama3" | "other" | "any"
    rope: str = "any"

    def matches(self, arch: Arch, vocab: int, rope_type: str | None) -> bool:
        shape = (arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads, arch.num_kv_heads, vocab)
        rope = self.rope == "any" or (self.rope == "llama3") == (rope_type == "llama3")
        return arch.family == self.family and shape == self.shape and rope

    def head_units(self, arch: Arch) -> int:
        """``--attn_channel_group_size`` in head units (each published one is one unit)."""
        return max(1, self.attn_channels // (arch.heads_per_unit * arch.head_dim))


_L2 = (0.44, 0.52, 0.04)
#: MultiPruner's published run commands (results/README.md), for the families rayprune prunes.
#: Not here: Baichuan2-7B/13B-Base (44:52:4, G=1024; model_type baichuan is not supported).
RECIPES: tuple[Recipe, ...] = (
    Recipe("Llama-2-7B", "llama", (32, 4096, 11008, 32, 32, 32000), _L2, 1024, 128),
    Recipe("Llama-2-13B", "llama", (40, 5120, 13824, 40, 40, 32000), _L2, 1024, 128),
    Recipe("Meta-Llama-3-8B", "llama", (32, 4096, 14336, 32, 8, 128256), (0.2, 0.8, 0.0), 1024, 512, "other"),
    Recipe("Llama-3.1-8B", "llama", (32, 4096, 14336, 32, 8, 128256), (0.3, 0.7, 0.0), 1024, 512, "llama3"),
    Recipe("Llama-3.2-3B", "llama", (28, 3072, 8192, 24, 8, 128256), (0.1, 0.9, 0.0), 768, 384),
    Recipe("Qwen2.5-7B", "qwen2", (28, 3584, 18944, 28, 4, 152064), (0.5, 0.5, 0.0), 1024, 896),
    Recipe("Qwen1.5-7B", "qwen2", (32, 4096, 11008, 32, 32, 151936), _L2, 1024, 128),
    Recipe("Qwen1.5-14B", "qwen2", (40, 5120, 13696, 40, 40, 152064), _L2, 2048, 128),
)


def rope_type(hf_config: Mapping[str, Any] | None) -> str | None:
    """``rope_scaling``'s type in a ``config.json`` (``llama3`` for Llama-3.1 and later), or None."""
    scaling = (hf_config or {}).get("rope_scaling") or {}
    return scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, Mapping) else None


def family_defaults(arch: Arch, vocab_hint: int | None = None, *,
                    hf_config: Mapping[str, Any] | None = None) -> MultiPrunerDefaults:
    """MultiPruner's published recipe for this model; else the closest published one of its
    family; else a rayprune default.

    ``hf_config`` (the model's ``config.json``) tells Llama-3.1 (``rope_scaling`` of type
    ``llama3``) from Llama-3, whose shapes are equal; without it that shape gets Llama-3's recipe
    (the two differ in the split only: 30:70:0 against 20:80:0).

    Family rules, where no recipe matches the shape: Llama-2 (vocab 32000, no GQA) 44:52:4; Llama-3
    (vocab 128256) 20:80:0, or 30:70:0 with ``llama3`` rope scaling (Llama-3.1-8B's); Qwen2 with GQA
    (Qwen2/2.5) 50:50:0; Qwen2 without GQA (Qwen1.5) 44:52:4; each with MLP groups of 1024 (a
    divisor of the width near a sixth where 1024 would leave no step) and one head unit. Anything else (SmolLM2 among them): 30:60:10 with MLP groups of about a sixth
    of the layer width (a divisor, so Optuna's and evolution's width grids can use it too) and one
    head unit: on small GQA models a head unit is a whole KV group (a third of SmolLM2's attention),
    so heads get a small share, and most of the budget goes to MLP width, which MultiPruner found
    to be the cheapest dimension in quality.
    """
    vocab, rope = vocab_hint or arch.vocab_size, rope_type(hf_config)
    for recipe in RECIPES:
        if recipe.matches(arch, vocab, rope):
            return MultiPrunerDefaults(recipe.split, recipe.mlp_group, recipe.head_units(arch),
                                       f"MultiPruner's {recipe.model} recipe ({SOURCE})")
    gqa = arch.num_heads != arch.num_kv_heads
    if arch.family == "llama" and vocab == 32000 and not gqa:
        return _family((0.44, 0.52, 0.04), arch, "Llama-2-7B")
    if arch.family == "llama" and vocab == 128256:
        return _family((0.3, 0.7, 0.0), arch, "Llama-3.1-8B") if rope == "llama3" else \
            _family((0.2, 0.8, 0.0), arch, "Meta-Llama-3-8B")
    if arch.family == "qwen2":
        return _family((0.5, 0.5, 0.0), arch, "Qwen2.5-7B") if gqa else _family(_L2, arch, "Qwen1.5-7B")
    return MultiPrunerDefaults((0.3, 0.6, 0.1), dividing_group(arch, max(1, arch.intermediate_size // 6)), 1,
                               "rayprune default for small GQA models")


def _family(split: tuple[float, float, float], arch: Arch, model: str) -> MultiPrunerDefaults:
    """The family's recipe on another shape: its group of 1024, unless that leaves no step."""
    group = 1024 if 1024 < arch.intermediate_size else dividing_group(arch, max(1, arch.intermediate_size // 6))
    return MultiPrunerDefaults(split, group, 1, f"the {model} recipe of MultiPruner, applied to its family")


def dividing_group(arch: Arch, wanted: int) -> int:
    """The divisor of the MLP width closest to ``wanted`` (ties: the smaller): the step of a width
    grid (Optuna's and evolution's levels), which must divide the width."""
    width = arch.intermediate_size
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), d))


def grid_group(arch: Arch) -> int:
    """The default MLP step of a width grid (Optuna's and evolution's levels, which must divide the
    width): the divisor nearest the family's MultiPruner group (which need not divide it)."""
    return dividing_group(arch, family_defaults(arch).mlp_group)


_group = dividing_group  # the name orchestrator/tune.py imports


def stage_budgets(split: tuple[float, float, float], target_ratio: float) -> tuple[float, float, float]:
    a, b, c = split
    return (a * target_ratio, (a + b) * target_ratio, target_ratio)


def multipruner_ratio(mask: Mask, arch: Arch) -> float:
    """The removed ratio as MultiPruner's ``count_parameters`` computes it: a removed block's norm
    weight stays counted (it is not part of the attention or MLP module). At most
    ``hidden_size`` per removed block below :func:`search_spaces.ratio`."""
    dense = dense_params(arch)
    return (dense - param_count(mask, arch, count_removed_norms=True)) / dense


def check_multipruner(arch: Arch, split: tuple[float, float, float], mlp_group: int, head_group: int) -> list[str]:
    """Every problem with a MultiPruner setting, each naming the fix (empty: fine).

    The MLP group need not divide the width (MultiPruner keeps ``w - k*G > 0``); it must leave at
    least one step, i.e. be below the width.
    """
    problems = []
    if len(split) != 3 or any(x < 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
        problems.append(f"search.split {':'.join(str(x) for x in split)} must be three non-negative shares "
                        f"summing to 1, e.g. 44:52:4 or [0.44, 0.52, 0.04]")
    if mlp_group < 1 or mlp_group >= arch.intermediate_size:
        problems.append(f"search.mlp_group {mlp_group} must be between 1 and {arch.intermediate_size - 1}: a width "
                        f"step keeps width - group > 0 channels of the MLP width {arch.intermediate_size}; use e.g. "
                        f"search.mlp_group={dividing_group(arch, max(1, arch.intermediate_size // 6))}")
    if head_group < 1 or head_group >= arch.num_head_units:
        unit = "KV group" if arch.heads_per_unit > 1 else "head"
        problems.append(f"search.head_group {head_group} must be between 1 and {arch.num_head_units - 1} head units "
                        f"(a unit is one {unit}: {arch.heads_per_unit} query heads; single query heads inside a "
                        f"GQA group cannot be removed on their own)")
    return problems
