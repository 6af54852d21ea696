"""MultiPruner's budget split and granularities, with per-family defaults.

The split ``a:b:c`` of a target ratio ``T`` gives cumulative stage budgets: blocks up to ``a*T``,
MLP channel groups up to ``(a+b)*T``, head units up to ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import Arch


@dataclass(frozen=True)
class MultiPrunerDefaults:
    split: tuple[float, float, float]
    mlp_group: int  # channels removed per stage-2 step
    head_group: int  # head units removed per stage-3 step
    why: str


def family_defaults(arch: Arch, vocab_hint: int | None = None) -> MultiPrunerDefaults:
    """The paper's settings where it has them; a reasoned default otherwise.

    Llama-2 (vocab 32000, no GQA): 44:52:4, MLP group 1024, one head. Llama-3 (vocab 128256):
    20:80:0. Qwen2/2.5: 50:50:0. Anything else (SmolLM2 among them): 30:60:10 with MLP groups of
    about a sixth of the layer width and one head unit: on small GQA models a head unit is a whole
    KV group (a third of SmolLM2's attention), so heads get a small share, and most of the budget
    goes to MLP width, which MultiPruner found to be the cheapest dimension in quality.
    """
    vocab = vocab_hint or arch.vocab_size
    if arch.family == "qwen2":
        return MultiPrunerDefaults((0.5, 0.5, 0.0), _group(arch, 1024), 1, "Qwen2.5-7B setting of the paper")
    if arch.family == "llama" and vocab == 32000 and arch.num_heads == arch.num_kv_heads:
        return MultiPrunerDefaults((0.44, 0.52, 0.04), _group(arch, 1024), 1, "Llama-2 setting of the paper")
    if arch.family == "llama" and vocab == 128256:
        return MultiPrunerDefaults((0.2, 0.8, 0.0), _group(arch, 1024), 1, "Llama-3-8B setting of the paper")
    return MultiPrunerDefaults((0.3, 0.6, 0.1), _group(arch, max(1, arch.intermediate_size // 6)), 1,
                               "rayprune default for small GQA models")


def _group(arch: Arch, wanted: int) -> int:
    """The divisor of the MLP width closest to ``wanted`` (ties: the smaller)."""
    width = arch.intermediate_size
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), d))


def stage_budgets(split: tuple[float, float, float], target_ratio: float) -> tuple[float, float, float]:
    a, b, c = split
    return (a * target_ratio, (a + b) * target_ratio, target_ratio)


def check_multipruner(arch: Arch, split: tuple[float, float, float], mlp_group: int, head_group: int) -> list[str]:
    """Every problem with a MultiPruner setting, each naming the fix (empty: fine)."""
    problems = []
    if len(split) != 3 or any(x < 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
        problems.append(f"search.split {':'.join(str(x) for x in split)} must be three non-negative shares "
                        f"summing to 1, e.g. 44:52:4 or [0.44, 0.52, 0.04]")
    if mlp_group < 1 or arch.intermediate_size % mlp_group:
        problems.append(f"search.mlp_group {mlp_group} does not divide the MLP width {arch.intermediate_size}; "
                        f"use a divisor such as {_group(arch, mlp_group)}")
    if head_group < 1 or head_group >= arch.num_head_units:
        unit = "KV group" if arch.heads_per_unit > 1 else "head"
        problems.append(f"search.head_group {head_group} must be between 1 and {arch.num_head_units - 1} head units "
                        f"(a unit is one {unit}: {arch.heads_per_unit} query heads; single query heads inside a "
                        f"GQA group cannot be removed on their own)")
    return problems
