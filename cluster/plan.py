"""A scaling model: how long a greedy campaign takes on N GPUs, before it starts.

Pure arithmetic (no torch, no Ray), so a 70B campaign can be planned from a laptop.

* Work. A forward pass costs ``2 x params x tokens`` FLOPs (embeddings excluded, LM head included).
  A BlockPruner step with ``c`` candidates costs ``c`` full forwards in the naive loop. With the
  engine's prefix reuse it costs one base pass plus, per candidate, the layers after its block and
  the head (candidates leave the base on average half-way: the exact sum is used).
* Steps. Greedy removal to ratio ``r`` takes ``r x dense / block`` steps; the block mix is not known
  in advance, so the plan gives the middle (half attention, half MLP) and the range (all MLP: fewest
  steps; all attention: most). MultiPruner adds width steps (one per channel group or head unit).
* Throughput. ``tflops`` is the *effective* rate of one GPU on this workload. A replica that needs
  k GPUs (the model does not fit one) is as fast as one GPU: accelerate's ``device_map`` runs the
  layers as a pipeline with one GPU busy at a time. Candidates of a step are split over replicas
  (each also runs its own base prefix); steps run one after another.
* Memory. ``rayprune plan`` takes k from :func:`size_replica` (accelerate's device map of the model on
  the meta device, with the engine's working memory kept back: :mod:`actors.sizing`, which needs
  torch and is imported only there); :func:`gpus_per_replica` is the torch-free estimate (weights x
  ``memory_headroom``) used when no k is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from search_spaces import Arch
from search_spaces.cost import attn_params, embedding_params, mlp_params

#: Reference architectures (config.json values) for planning without the checkpoints.
REFERENCE_MODELS: dict[str, dict] = {
    "llama2-7b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama2-13b": {"model_type": "llama", "num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "llama2-70b": {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
}


@dataclass(frozen=True)
class Hardware:
    tflops: float = 35.0  # effective bf16 TFLOPS of one GPU on these forwards (see bench/RESULTS.md)
    gpu_memory_gb: float = 80.0
    bytes_per_param: float = 2.0  # bf16
    memory_headroom: float = 1.25  # activations, CUDA context, fragmentation


@dataclass(frozen=True)
class Plan:
    model: str
    method: str
    gpus: int
    gpus_per_replica: int
    replicas: int
    steps: int
    evaluations: int
    hours_naive: float
    hours_engine: float
    steps_detail: str  # blocks (range) for BlockPruner; blocks + widths + heads for MultiPruner

    @property
    def feasible(self) -> bool:
        return self.replicas >= 1


def gpus_per_replica(arch: Arch, hw: Hardware) -> int:
    from search_spaces import dense_params

    need = dense_params(arch) * hw.bytes_per_param * hw.memory_headroom / 1e9
    return max(1, math.ceil(need / hw.gpu_memory_gb))


def _layer_flops_per_token(arch: Arch) -> tuple[float, float, float]:
    """(attention block, MLP block, head) forward FLOPs per token."""
    head = 2 * arch.vocab_size * arch.hidden_size
    return 2 * attn_params(arch, arch.num_head_units), 2 * mlp_params(arch, arch.intermediate_size), head


def step_seconds(arch: Arch, starts: list[int], keep: float, tokens: int, replicas: int,
                 tflops: float) -> tuple[float, float]:
    """(naive, engine) wall seconds of one greedy step whose candidates leave the base at ``starts``.

    A candidate that leaves at block ``p`` runs blocks ``p..`` (its own block narrowed, or skipped:
    the difference is small and ignored) and the head. Each replica takes ``ceil(c / replicas)``
    candidates; with the engine it first runs the base up to the last block where one of its
    candidates starts (the whole base with one replica, about half with chunks split by start), and
    never more than the naive loop. Removed blocks are assumed spread evenly (``keep``).
    """
    attn, mlp, head = _layer_flops_per_token(arch)
    block = [(attn if i % 2 == 0 else mlp) * keep for i in range(arch.num_blocks)]
    base = sum(block)
    per_replica = math.ceil(len(starts) / replicas)
    mean_suffix = sum(sum(block[p:]) for p in starts) / len(starts)
    naive = per_replica * (base + head)
    prefix = base if replicas == 1 else base / 2
    engine = min(naive, prefix + per_replica * (mean_suffix + head))
    rate = tflops * 1e12 / tokens
    return naive / rate, engine / rate


def ratio_for_speedup(arch: Arch, speedup: float) -> float:
    """The parameter ratio that gives ``speedup`` in this model's FLOP terms (the LM head stays).

    A planning stand-in for a latency target (SPRINT's ``target_speedup``): a forward costs
    ``2 x params`` FLOPs per token, so a ``speedup`` removes ``1 - 1/speedup`` of those FLOPs.
    """
    from search_spaces import dense_params

    attn, mlp, head = _layer_flops_per_token(arch)
    layers = arch.num_layers * (attn + mlp)
    removed = (layers + head) * (1 - 1 / speedup)
    if speedup < 1 or removed >= layers:
        top = (layers + head) / head
        raise ValueError(f"a {speedup:g}x speedup is outside what removing blocks can give this model "
                         f"(1x to {top:.1f}x); set search.target_speedup inside that range")
    return removed / 2 / dense_params(arch)


def _stages(arch: Arch, method: str, target: float, split: tuple[float, float, float], mlp_group: int):
    """(steps, candidate starts per step as a function of the step) for each stage of a method."""
    from search_spaces import dense_params

    dense = dense_params(arch)
    attn_b, mlp_b = attn_params(arch, arch.num_head_units), mlp_params(arch, arch.intermediate_size)
    shares = (1.0, 0.0, 0.0) if method == "blockpruner" else split
    blocks = math.ceil(shares[0] * target * dense / ((attn_b + mlp_b) / 2))
    group = 3 * arch.hidden_size * mlp_group
    unit = attn_b // arch.num_head_units
    widths, heads = math.ceil(shares[1] * target * dense / group), math.ceil(shares[2] * target * dense / unit)
    L = arch.num_layers
    return [
        (blocks, lambda s: list(range(arch.num_blocks - s))),  # every remaining block, spread out
        (widths, lambda s: [2 * l + 1 for l in range(L)]),  # one MLP per layer
        (heads, lambda s: [2 * l for l in range(L)]),  # one attention per layer
    ]


def plan_campaign(arch: Arch, name: str, method: str, target_ratio: float, tokens: int, gpus: int, hw: Hardware,
                  split: tuple[float, float, float] = (0.44, 0.52, 0.04), mlp_group: int = 1024,
                  replica_gpus: int | None = None) -> Plan:
    """Wall time of a BlockPruner or MultiPruner campaign to ``target_ratio`` on ``gpus`` GPUs.

    ``replica_gpus``: GPUs per replica (e.g. from :func:`size_replica`; 0: no replica fits a node);
    None: :func:`gpus_per_replica`'s estimate.
    """
    from search_spaces import dense_params

    dense = dense_params(arch)
    attn_b, mlp_b = attn_params(arch, arch.num_head_units), mlp_params(arch, arch.intermediate_size)
    k = gpus_per_replica(arch, hw) if replica_gpus is None else replica_gpus
    replicas = gpus // k if k else 0
    stages = _stages(arch, method, target_ratio, split, mlp_group)
    steps = sum(n for n, _ in stages)
    if method == "blockpruner":  # the block mix is unknown: all MLP (fewest steps) to all attention
        removed = target_ratio * dense
        detail = f"{steps} ({math.ceil(removed / mlp_b)}-{math.ceil(removed / attn_b)})"
    else:
        detail = " + ".join(str(n) for n, _ in stages)
    evaluations = sum(len(starts(s)) for n, starts in stages for s in range(n))
    if replicas < 1:
        return Plan(name, method, gpus, k, 0, steps, evaluations, math.inf, math.inf, detail)
    naive = engine = 0.0
    done = 0
    for n, starts in stages:
        for s in range(n):
            keep = 1 - (done + s) / max(steps, 1) * target_ratio  # the model shrinks as it goes
            a, b = step_seconds(arch, starts(s), keep, tokens, replicas, hw.tflops)
            naive, engine = naive + a, engine + b
        done += n
    return Plan(name, method, gpus, k, replicas, steps, evaluations, naive / 3600, engine / 3600, detail)


def plan_search(arch: Arch, model: str, search: Any, tokens: int, gpus: Sequence[int],
                hw: Hardware, replica_gpus: int | None = None) -> tuple[list[Plan], list[str]]:
    """The plans of a campaign's ``search`` config on each GPU count, and notes on what was assumed.

    The planning rules: SPRINT and Optuna are planned as BlockPruner (an upper bound for SPRINT,
    whose candidates cost local forwards; Optuna runs ``search.trials`` full forwards instead of
    greedy steps); a ``target_speedup`` without a ratio is planned at the ratio whose FLOPs give
    that speedup; MultiPruner's split and group default to the model family's.
    """
    from search_spaces.budget import family_defaults

    defaults = family_defaults(arch)
    method = search.method if search.method in ("blockpruner", "multipruner") else "blockpruner"
    target, notes = search.target_ratio, []
    if target is None:  # a latency target only (SPRINT)
        target = ratio_for_speedup(arch, search.target_speedup)
        notes.append(f"search.target_speedup {search.target_speedup:g}x is planned as parameter ratio {target:.3f} "
                     f"(blocks whose FLOPs give that speedup).")
    if method != search.method:
        notes.append(f"search.method {search.method} is planned as BlockPruner, an upper bound: "
                     + ("SPRINT scores candidates with local forwards on one evaluator instead of full forwards."
                        if search.method == "sprint" else
                        f"Optuna runs search.trials ({search.trials}) full forwards instead of greedy steps."))
    plans = [plan_campaign(arch, model, method, target, tokens, g, hw, search.split or defaults.split,
                           search.mlp_group or defaults.mlp_group, replica_gpus) for g in gpus]
    return plans, notes


def format_plans(plans: list[Plan], tokens: int, hw: Hardware) -> str:
    lines = [f"calibration {tokens:,} tokens; {hw.tflops:g} effective TFLOPS per GPU, {hw.gpu_memory_gb:g} GB per GPU",
             "", "| model | method | GPUs | GPUs/replica | replicas | steps | evaluations | naive loop | engine |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for p in plans:
        if not p.feasible:
            k = p.gpus_per_replica or "-"  # 0: no node holds a replica
            lines.append(f"| {p.model} | {p.method} | {p.gpus} | {k} | 0 | - | - | does not fit | "
                         f"does not fit |")
            continue
        lines.append(f"| {p.model} | {p.method} | {p.gpus} | {p.gpus_per_replica} | {p.replicas} | {p.steps_detail} "
                     f"| {p.evaluations:,} | {_hours(p.hours_naive)} | "
                     f"{_hours(p.hours_engine)} |")
    return "\n".join(lines)


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def size_replica(model_config: dict, config: Any, gpu_memory_gb: float, max_gpus: int = 8) -> Any:
    """The replica of ``model_config`` for campaign ``config`` (its dtype, batch size, window lengths,
    SPRINT settings) on GPUs of ``gpu_memory_gb``: an :class:`actors.sizing.ReplicaSize` (k, weights
    per GPU from accelerate's device map on the meta device, working memory). Raises
    :class:`actors.sizing.ReplicaTooLarge` when ``max_gpus`` GPUs of one node do not hold it.
    Imports torch, transformers and accelerate (no weights are loaded).
    """
    from actors.sizing import replica_size

    from .replica_size import working_memory_of

    gpu_bytes = int(gpu_memory_gb * 1e9)
    working = working_memory_of(config, model_config, gpu_bytes)
    return replica_size(model_config, config.dtype, gpu_bytes, working, max_gpus=max_gpus)
