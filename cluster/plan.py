"""A scaling model: how long a campaign takes on N GPUs, before it starts, with its assumptions.

Pure arithmetic (no torch, no Ray), so a 70B campaign can be planned from a laptop.

* Work. A forward pass costs ``2 x params x tokens`` FLOPs (embeddings excluded, LM head included).
  The naive loop runs one full forward per candidate. The engine runs each tile's base prefix once
  and each candidate's suffix (:mod:`cluster.plan_dispatch` simulates the dispatch of every step).
* Steps. The greedy path removes the blocks that cost least in quality, which is not known before
  it runs, and under GQA attention and MLP blocks differ in size (Llama-2-70B: 151M against 705M
  parameters). So the plan gives the range that is possible: *fewest* steps (largest blocks first:
  MLPs, then attention) and *most* (smallest first: every attention block, at most one per layer,
  then MLPs), and a *middle*: half of the removed parameters from attention, half from MLPs
  (SmolLM2's demo path took 65% from attention, paths on Llama-2 start with attention too: a rule
  nearer what greedy paths do than equal block counts). A step scores every block still present.
  MultiPruner adds width steps (one channel group or head unit each, one candidate per layer).
  SPRINT's steps cost local forwards (:func:`cluster.plan_dispatch.step_candidates`); its latency
  target is planned as the ratio whose blocks' FLOPs give that speedup (:func:`ratio_for_speedup`).
* Replicas. A replica of k GPUs lives on one node: ``floor(g / k)`` replicas per node of g GPUs
  (a last, partial node holds ``floor((gpus mod g) / k)``). It is as fast as one GPU: accelerate's
  ``device_map`` runs the layers as a pipeline with one GPU busy at a time.
* Throughput. ``tflops`` is the *effective* 16-bit rate of one GPU on these forwards; fp32 runs TF32
  matmuls at about half of it (``fp32_tflops`` overrides; on a CPU give the measured rate).
* Around the search: starting the processes, loading the weights from shared storage (bytes in the
  dtype / ``read_gb_s``, all replicas at once), ``reloads`` restarts (each a new start and load),
  the held-out evaluation (dense and pruned on the evaluation windows, dispatched like a step) and
  the export (the checkpoint read once, the pruned model written once, at ``read_gb_s``).
* Memory. ``rayprune plan`` takes k from :func:`size_replica` (accelerate's device map of the model on
  the meta device, with the engine's working memory kept back: :mod:`actors.sizing`, which needs
  torch and is imported only there); :func:`gpus_per_replica` is the torch-free estimate (weights x
  ``memory_headroom``) used when no k is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from search_spaces import Arch, dense_params
from search_spaces.cost import attn_params, embedding_params, mlp_params
from search_spaces.latency import BlockCosts

from .plan_dispatch import block_flops as _layer_flops_per_token
from .plan_dispatch import Candidate, PathCost, search_cost, simulate_step

#: Reference architectures (config.json values) for planning without the checkpoints.
REFERENCE_MODELS: dict[str, dict] = {
    "llama2-7b": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama2-13b": {"model_type": "llama", "num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 13824,
                   "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000},
    "llama2-70b": {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000},
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TILINGS = {"scorer": "as the scorer does (2 mask chunks per replica, window shards only when there are fewer "
                     "chunks), sent in order",
           "shards": "windows first (2 shards per replica, masks chunked only when windows run out), longest first",
           "chunks": "as before issue #12 (2 mask chunks per replica, no shards), sent in order"}
RULES = ("fewest", "middle", "most")  # the block mixes of a greedy path (module docstring)
MIDDLE_ATTN_SHARE = 0.5  # the middle path: this share of the removed parameters from attention


@dataclass(frozen=True)
class Hardware:
    """The machines and what running on them costs besides the forwards (each figure is stated)."""

    tflops: float = 35.0  # effective bf16/fp16 TFLOPS of one GPU on these forwards (see bench/RESULTS.md)
    gpu_memory_gb: float = 80.0
    gpus_per_node: int = 8
    fp32_tflops: float | None = None  # None: half of tflops (TF32 matmuls)
    memory_headroom: float = 1.25  # activations, CUDA context, fragmentation
    read_gb_s: float = 1.0  # shared storage, per replica (GB/s); also the export's write rate
    startup_s: float = 30.0  # Ray job, actor processes and their imports (nodes already up)
    reloads: float = 1.0  # expected restarts of a replica during the campaign (each: start + load)
    straggler: float = 0.2  # a step waits for its longest tile on a replica this much slower
    tile_overhead_s: float = 0.1  # per tile: the Ray call and the driver's cache write
    tiling: str = "scorer"  # how a step is cut into tiles (plan_dispatch.tiling): scorer | shards | chunks

    def flops(self, dtype: str) -> float:
        """Effective FLOP/s of one replica in ``dtype``."""
        if dtype == "float32":
            return (self.fp32_tflops if self.fp32_tflops is not None else self.tflops / 2) * 1e12
        return self.tflops * 1e12


@dataclass(frozen=True)
class Plan:
    model: str
    method: str
    gpus: int
    gpus_per_replica: int
    replicas: int
    dtype: str = "bfloat16"
    paths: dict[str, PathCost] = field(default_factory=dict)  # by rule: fewest, middle, most
    load_s: float = 0.0  # start, weights (and MultiPruner's channel order: one more read)
    reload_s: float = 0.0
    heldout_s: float = 0.0
    export_s: float = 0.0
    note: str = ""

    @property
    def feasible(self) -> bool:
        return self.replicas >= 1

    @property
    def steps(self) -> int:
        return self.paths["middle"].steps

    @property
    def evaluations(self) -> int:
        return self.paths["middle"].evaluations

    @property
    def hours_naive(self) -> float:
        return self.paths["middle"].naive_s / 3600 if self.feasible else math.inf

    @property
    def hours_engine(self) -> float:
        return self.paths["middle"].engine_s / 3600 if self.feasible else math.inf

    def total_s(self, rule: str = "middle") -> float:
        """Wall seconds of the whole campaign with the ``rule`` block mix."""
        if not self.feasible:
            return math.inf
        return self.load_s + self.reload_s + self.paths[rule].engine_s + self.heldout_s + self.export_s


def gpus_per_replica(arch: Arch, hw: Hardware, dtype: str = "bfloat16") -> int:
    need = dense_params(arch) * DTYPE_BYTES[dtype] * hw.memory_headroom / 1e9
    return max(1, math.ceil(need / hw.gpu_memory_gb))


def replicas_on_nodes(gpus: int, k: int, gpus_per_node: int) -> int:
    """Replicas of ``k`` GPUs on ``gpus`` GPUs in nodes of ``gpus_per_node``: a replica lives on one node."""
    if k > gpus_per_node:
        raise ValueError(f"a replica of {k} GPUs does not fit a node of {gpus_per_node} GPUs (a replica lives on "
                         f"one node: accelerate's device map does not span machines)")
    return (gpus // gpus_per_node) * (gpus_per_node // k) + (gpus % gpus_per_node) // k if k else 0


def block_path(arch: Arch, removed: float, rule: str) -> list[str]:
    """The kinds ("attn", "mlp") of the blocks a greedy path removes to remove ``removed`` parameters."""
    size = {"attn": attn_params(arch, arch.num_head_units), "mlp": mlp_params(arch, arch.intermediate_size)}
    L = arch.num_layers
    if removed > L * (size["attn"] + size["mlp"]):
        raise ValueError(f"removing {removed:,.0f} parameters needs more than every block of the model")
    if rule == "middle":
        a = min(L, math.ceil(MIDDLE_ATTN_SHARE * removed / size["attn"]))
        m = min(L, math.ceil(max(0.0, removed - a * size["attn"]) / size["mlp"]))
        a = max(a, min(L, math.ceil(max(0.0, removed - m * size["mlp"]) / size["attn"])))
        at = sorted([((i + 0.5) / a, "attn") for i in range(a)] + [((j + 0.5) / m, "mlp") for j in range(m)])
        return [kind for _, kind in at]
    path, left = [], removed
    for kind in sorted(size, key=size.get, reverse=rule == "fewest"):
        n = min(L, max(0, math.ceil(left / size[kind])))
        path, left = path + [kind] * n, left - n * size[kind]
    return path


def _stage_counts(arch: Arch, method: str, target: float, split: tuple[float, float, float], mlp_group: int,
                  rule: str) -> tuple[list[str], int, int]:
    dense = dense_params(arch)
    shares = split if method == "multipruner" else (1.0, 0.0, 0.0)
    kinds = block_path(arch, shares[0] * target * dense, rule)
    unit = attn_params(arch, arch.num_head_units) // arch.num_head_units
    widths = math.ceil(shares[1] * target * dense / (3 * arch.hidden_size * mlp_group))
    return kinds, widths, math.ceil(shares[2] * target * dense / unit)


def plan_campaign(arch: Arch, name: str, method: str, target_ratio: float, tokens: int, gpus: int, hw: Hardware,
                  split: tuple[float, float, float] = (0.44, 0.52, 0.04), mlp_group: int = 1024,
                  replica_gpus: int | None = None, *, dtype: str = "bfloat16", window_length: int = 2048,
                  eval_tokens: int = 262144, eval_length: int = 2048, max_steps: int | None = None,
                  top_k: int = 5, batch_size: int = 4) -> Plan:
    """Wall time of a BlockPruner, MultiPruner or SPRINT campaign to ``target_ratio`` on ``gpus`` GPUs.

    ``replica_gpus``: GPUs per replica (e.g. from :func:`size_replica`; 0: no replica fits a node);
    None: :func:`gpus_per_replica`'s estimate. ``tokens`` of calibration in windows of
    ``window_length``; ``eval_tokens`` held-out in windows of ``eval_length``; ``dtype`` (auto: a
    GPU's bf16) sets the bytes loaded and written and the rate; ``batch_size``: windows per forward
    (window shards are cut at batches).
    """
    dtype = "bfloat16" if dtype == "auto" else dtype
    k = gpus_per_replica(arch, hw, dtype) if replica_gpus is None else replica_gpus
    try:
        replicas = replicas_on_nodes(gpus, k, hw.gpus_per_node)
    except ValueError as exc:
        return Plan(name, method, gpus, k, 0, dtype, note=str(exc))
    if replicas < 1:
        return Plan(name, method, gpus, k, 0, dtype)
    flops = hw.flops(dtype)
    paths = {rule: search_cost(arch, method, _stage_counts(arch, method, target_ratio, split, mlp_group, rule),
                               mlp_group, tokens, window_length, replicas, flops, straggler=hw.straggler,
                               tile_overhead_s=hw.tile_overhead_s, policy=hw.tiling, batch_size=batch_size,
                               max_steps=max_steps, top_k=top_k)
             for rule in RULES}
    dense, middle = dense_params(arch), paths["middle"]
    weights = dense * DTYPE_BYTES[dtype] / (hw.read_gb_s * 1e9)
    load = hw.startup_s + weights * (2 if method == "multipruner" else 1)  # + the channel order's read
    kept = dense - middle.attn_removed * attn_params(arch, arch.num_head_units) \
        - middle.mlp_removed * mlp_params(arch, arch.intermediate_size) - middle.widths * 3 * arch.hidden_size * mlp_group
    head = _layer_flops_per_token(arch)[2]
    layers = [2 * (n - embedding_params(arch)) for n in (dense, kept)]  # FLOPs per token, dense and pruned
    held = simulate_step([Candidate(layers[0], head, 1), Candidate(0.0, layers[1] + head, arch.num_blocks + 1)],
                         eval_tokens, eval_length, replicas, flops, policy=hw.tiling, batch_size=batch_size,
                         straggler=hw.straggler, tile_overhead_s=hw.tile_overhead_s)
    export = (dense + kept) * DTYPE_BYTES[dtype] / (hw.read_gb_s * 1e9)
    return Plan(name, method, gpus, k, replicas, dtype, paths, load, hw.reloads * (hw.startup_s + weights),
                held.seconds, export)


def ratio_for_speedup(arch: Arch, speedup: float, *, fixed: bool = False, costs: BlockCosts | None = None) -> float:
    """The parameter ratio a SPRINT campaign removes to reach ``speedup``: how ``rayprune plan``
    plans a latency target (``search.target_speedup``) before any latency is measured.

    SPRINT's estimated speedup (``search_spaces.latency.speedup``) is the dense latency over that of
    the kept blocks. Without a fixed part (``search.sprint.latency_fixed: false``, SPRINT's own
    arithmetic) removing ``1 - 1/speedup`` of the blocks' cost gives it; with ``fixed`` the fixed part
    stays on both sides, so more must go (and at most ``(blocks + fixed) / fixed`` is reachable).
    ``costs``: per-block costs of one forward (a latency table's, for the campaign's scenario);
    default this model's FLOPs per token (each attention and MLP block; the LM head as the fixed
    part), i.e. cost in proportion to parameters. The removed cost is taken as the same share of the
    attention and of the MLP blocks (which blocks go is the search's decision); in FLOPs any mix
    gives the same ratio.
    """
    attn_flops, mlp_flops, head = _layer_flops_per_token(arch)
    costs = BlockCosts(head, attn_flops, mlp_flops) if costs is None else costs
    costs = costs if fixed else costs.blocks_only()
    blocks = arch.num_layers * (costs.attn + costs.mlp)
    removed = (blocks + costs.fixed) * (1 - 1 / speedup) if speedup > 0 else -1.0
    if not math.isfinite(speedup) or speedup < 1 or removed >= blocks:
        top = f"{(blocks + costs.fixed) / costs.fixed:.1f}x" if costs.fixed > 0 else "any finite speedup"
        raise ValueError(f"a {speedup:g}x speedup is outside what removing blocks can give this model "
                         f"(1x to {top}{' with its fixed part: search.sprint.latency_fixed' if fixed else ''}); "
                         f"set search.target_speedup inside that range")
    share = removed / blocks  # of every block's cost, so of every block's parameters
    per_layer = attn_params(arch, arch.num_head_units) + mlp_params(arch, arch.intermediate_size)
    return share * arch.num_layers * per_layer / dense_params(arch)


def plan_search(arch: Arch, model: str, search: Any, tokens: int, gpus: Sequence[int], hw: Hardware,
                replica_gpus: int | None = None, **workload: Any) -> tuple[list[Plan], list[str]]:
    """The plans of a campaign's ``search`` config on each GPU count, and notes on what was assumed.

    ``workload``: :func:`plan_campaign`'s keywords (dtype, windows, held-out tokens). The planning
    rules: Optuna is planned as BlockPruner (it runs ``search.trials`` full forwards instead of greedy
    steps); SPRINT's steps are split by window shards over every replica (issue #12); a
    ``target_speedup`` without a ratio is planned at the ratio whose FLOPs give that speedup, with
    the LM head as a fixed part only under ``search.sprint.latency_fixed``;
    MultiPruner's split and group default to the model family's.
    """
    from search_spaces.budget import family_defaults

    defaults = family_defaults(arch)
    method = search.method if search.method in ("blockpruner", "multipruner", "sprint") else "blockpruner"
    target, notes = search.target_ratio, []
    sprint = getattr(search, "sprint", None)
    if target is None:  # a latency target only (SPRINT)
        fixed = bool(getattr(sprint, "latency_fixed", False))
        target = ratio_for_speedup(arch, search.target_speedup, fixed=fixed)
        notes.append(f"search.target_speedup {search.target_speedup:g}x is planned as parameter ratio {target:.3f} "
                     f"(blocks whose FLOPs give that speedup, " + ("the LM head counted as a fixed part: "
                     "search.sprint.latency_fixed)." if fixed else "with no fixed part, as SPRINT's arithmetic)."))
    if method != search.method:
        notes.append(f"search.method {search.method} is planned as BlockPruner: Optuna runs search.trials "
                     f"({search.trials}) full forwards instead of greedy steps.")
    if method == "sprint":
        notes.append("SPRINT: local sensitivities (each block and the next MLP), top_k refits of that MLP, one "
                     "perplexity per step, split by window shards over every replica; no naive loop.")
    top_k = getattr(sprint, "top_k", 5)
    plans = [plan_campaign(arch, model, method, target, tokens, g, hw, search.split or defaults.split,
                           search.mlp_group or defaults.mlp_group, replica_gpus, max_steps=search.max_steps,
                           top_k=top_k, batch_size=search.batch_size, **workload) for g in gpus]
    notes += sorted({p.note for p in plans if p.note})
    return plans, notes


def assumptions(hw: Hardware, dtype: str, tokens: int, window_length: int, eval_tokens: int, eval_length: int) -> str:
    """What every figure of a plan assumes, in words."""
    dtype = "bfloat16" if dtype == "auto" else dtype
    return (f"calibration {tokens:,} tokens ({window_length}-token windows), held-out {eval_tokens:,} "
            f"({eval_length}-token windows); {dtype}: {hw.flops(dtype) / 1e12:g} effective TFLOPS per replica"
            f"{' (TF32: half the 16-bit rate)' if dtype == 'float32' and hw.fp32_tflops is None else ''}, "
            f"{DTYPE_BYTES[dtype]} bytes per parameter; {hw.gpu_memory_gb:g} GB per GPU, {hw.gpus_per_node} GPUs per "
            f"node; weights read at {hw.read_gb_s:g} GB/s per replica after a {hw.startup_s:g} s start, "
            f"{hw.reloads:g} restart(s) expected; tiles of (mask chunk x window shard) cut {TILINGS[hw.tiling]}, "
            f"{hw.tile_overhead_s:g} s each, a step waits {hw.straggler:.0%} of its longest tile more "
            f"(stragglers). Figures: the middle block mix of the greedy path (the range: fewest-most steps; times: "
            f"the least-most of the three); middle: half the removed parameters from attention blocks, fewest: "
            f"largest blocks first, most: smallest first (at most one attention block per layer).")


def format_plans(plans: list[Plan]) -> str:
    lines = ["| model | method | GPUs | GPUs/replica | replicas | steps | attention + MLP blocks | evaluations | "
             "naive loop | engine | balanced bound | load, restarts | held-out, export | total |",
             "|---|---|---:|---:|---:|---|---|---|---:|---|---:|---:|---:|---|"]
    for p in plans:
        if not p.feasible:
            k = p.gpus_per_replica or "-"  # 0: no node holds a replica
            lines.append(f"| {p.model} | {p.method} | {p.gpus} | {k} | 0 | - | - | - | does not fit | does not fit "
                         f"| - | - | - | - |")
            continue
        lo, mid, hi = (p.paths[r] for r in RULES)
        steps = f"{mid.steps} ({lo.steps}-{hi.steps})"
        if p.method == "multipruner":
            steps = f"{mid.steps - mid.widths - mid.heads} ({lo.steps - lo.widths - lo.heads}-" \
                    f"{hi.steps - hi.widths - hi.heads}) + {mid.widths} + {mid.heads}"
        mix = f"{mid.attn_removed} + {mid.mlp_removed} ({lo.attn_removed} + {lo.mlp_removed} to " \
              f"{hi.attn_removed} + {hi.mlp_removed})"
        lines.append(f"| {p.model} | {p.method} | {p.gpus} | {p.gpus_per_replica} | {p.replicas} | {steps} | {mix} | "
                     f"{mid.evaluations:,} ({lo.evaluations:,}-{hi.evaluations:,}) | {_time(mid.naive_s)} | "
                     f"{_time(mid.engine_s)} ({_span(*_extremes(p.paths[r].engine_s for r in RULES))}) | {_time(mid.bound_s)} | "
                     f"{_time(p.load_s)}, {_time(p.reload_s)} | {_time(p.heldout_s)}, {_time(p.export_s)} | "
                     f"**{_time(p.total_s())}** ({_span(*_extremes(p.total_s(r) for r in RULES))}) |")
    return "\n".join(lines)


def _time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _extremes(values) -> tuple[float, float]:
    values = list(values)
    return min(values), max(values)


def _span(lo: float, hi: float) -> str:
    """``lo-hi`` with the unit once where both share it (``7.3-23.0 h``)."""
    a, b = _time(lo), _time(hi)
    return f"{a.rsplit(' ', 1)[0]}-{b}" if a.rsplit(" ", 1)[-1] == b.rsplit(" ", 1)[-1] else f"{a}-{b}"


def reference_table(hw: Hardware = Hardware(), target: float = 0.22, gpus: Sequence[int] = (8, 64)) -> str:
    """The plan of Llama-2-7B and Llama-2-70B with BlockPruner, MultiPruner and SPRINT, as markdown.

    The papers' setups: 32 x 2048 calibration tokens for BlockPruner and MultiPruner (44:52:4, MLP
    groups of 1024, as MultiPruner's code uses them: a group need not divide the width), 128 x 2048
    for SPRINT (top 5 refits); held-out 128 x 2048 tokens; bf16; k from the weights x 1.25.
    """
    plans = []
    for model in ("llama2-7b", "llama2-70b"):
        arch = Arch.from_hf_config(REFERENCE_MODELS[model])
        for method, tokens in (("blockpruner", 65536), ("multipruner", 65536), ("sprint", 262144)):
            plans += [plan_campaign(arch, model, method, target, tokens, g, hw, mlp_group=1024) for g in gpus]
    return "\n".join([f"Target ratio {target:g}. " + assumptions(hw, "bfloat16", 65536, 2048, 262144, 2048)
                      + " MultiPruner: 44:52:4, MLP groups of 1024, one head unit per step. "
                      "SPRINT: 262,144 calibration tokens, top 5 refits per step.", "", format_plans(plans)])


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
