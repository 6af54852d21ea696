"""The search's seconds, step by step: each step's candidates, dispatched as tiles on R replicas.

Pure arithmetic (no torch, no Ray), the step model behind :mod:`cluster.plan`; a search is the sum
of its steps (:func:`search_cost`), each simulated (:func:`simulate_step`).

A step scores candidates that leave the current model (the base) at different blocks. The engine
(actors/engine.py) runs a tile's windows through the base up to the *last* block where one of its
candidates leaves (it keeps the stream entering each of those blocks), then each candidate's
suffix: the blocks after the one it removes (or from the one it narrows) and the LM head. So

    tile FLOPs = (prefix of its latest candidate + sum of its candidates' suffixes) x tokens of its shard.

Splitting the *windows* adds no work (each shard runs the prefix on its own windows only); splitting
the *candidates* reruns the prefix once per chunk. The old plan divided the suffixes evenly and
charged half a prefix per replica, which is what an ideal split would cost; dispatched as chunks
only, a step costs much more (issue #12: Llama-2-7B step 1 at 262k tokens on 16 replicas, 525 s
simulated against the old plan's 254 s).

Scheduling: tiles go to the first free replica in the order the scorer makes them (list scheduling;
longest first, Graham's LPT, is within 4/3 of the best possible makespan). A straggler allowance adds ``straggler`` x the longest tile when
there are several replicas: the last tile may land on one that is that much slower (a busier node,
a restart's warm-up).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from search_spaces import Arch
from search_spaces.cost import attn_params, mlp_params
from search_spaces.tiling import balanced_chunks, window_shards


@dataclass(frozen=True)
class Candidate:
    """FLOPs per token of one candidate: the base prefix it needs and its own suffix (head included);
    ``weight``: the cost the scorer chunks on (dense blocks after its start + 1, not FLOPs)."""

    prefix: float
    suffix: float
    weight: float


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step: simulated dispatch (``seconds``), the balanced bound, and the tiles."""

    seconds: float
    bound: float  # one prefix pass + every suffix, divided evenly over the replicas, no overhead
    tiles: int
    longest_tile: float


@dataclass(frozen=True)
class PathCost:
    """One block mix of a campaign: its counts and the seconds of its search."""

    steps: int
    attn_removed: int
    mlp_removed: int
    evaluations: int
    engine_s: float  # simulated dispatch of every step
    bound_s: float  # every step's work divided evenly over the replicas
    naive_s: float  # one full forward per candidate (nan for SPRINT)
    widths: int = 0  # MultiPruner: MLP width steps
    heads: int = 0  # MultiPruner: head-unit steps


def tiling(candidates: int, replicas: int, windows: int, *, policy: str = "scorer", batch_size: int = 4,
           per_replica: int = 2) -> tuple[int, list[int]]:
    """(mask chunks, windows of each shard) of a step, ``per_replica`` tiles per replica wanted so that
    a replica that finishes early finds work; one replica gets the whole step as one tile.

    ``scorer``: what orchestrator/scorer.py does: up to 2 chunks per replica, and window shards (cut
    at batch boundaries) only when there are fewer chunks than that (few candidates, held-out);
    ``chunks``: the dispatcher before issue #12, chunks only; ``shards``: windows first (that adds no
    work), candidates split only when there are fewer windows than tiles wanted.
    """
    if replicas <= 1:
        return 1, [windows]
    tiles = per_replica * replicas
    if policy == "shards":
        n_shards = max(1, min(windows, tiles))
        return min(candidates, math.ceil(tiles / n_shards)), [len(r) for r in _split(windows, n_shards)]
    chunks = min(candidates, tiles)
    if policy == "chunks":
        return chunks, [windows]
    if policy != "scorer":
        raise ValueError(f"unknown tiling {policy!r} (scorer, shards, chunks)")
    return chunks, [b - a for a, b in window_shards(windows, batch_size, chunks, replicas)]


def list_schedule(durations: Sequence[float], replicas: int, *, longest_first: bool = True) -> float:
    """Makespan of greedy list scheduling: each tile to the replica that frees up first."""
    order = sorted(durations, reverse=True) if longest_first else list(durations)
    free = [0.0] * max(1, replicas)
    for d in order:
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def simulate_step(candidates: Sequence[Candidate], tokens: int, window_length: int, replicas: int, flops: float, *,
                  policy: str = "scorer", batch_size: int = 4, straggler: float = 0.2, tile_overhead_s: float = 0.1,
                  longest_first: bool | None = None, per_replica: int = 2) -> StepTime:
    """Wall seconds of one step on ``replicas`` replicas of ``flops`` effective FLOP/s each.

    Candidates are sorted by prefix and chunked on their ``weight`` as the scorer chunks them; the
    windows (``tokens // window_length`` of them) are split into shards by :func:`tiling`'s
    ``policy``. Each tile costs ``tile_overhead_s`` more (a Ray call, the driver's cache write).
    Tiles are sent in order, chunk by chunk, as the dispatcher sends them; ``longest_first`` (the
    default with ``policy="shards"``) sends the longest first. ``policy="chunks", straggler=0,
    tile_overhead_s=0`` is the dispatcher before issue #12.
    """
    if not candidates:
        return StepTime(0.0, 0.0, 0, 0.0)
    ordered = sorted(candidates, key=lambda c: c.prefix)
    windows = max(1, tokens // max(1, window_length))
    n_chunks, shards = tiling(len(ordered), replicas, windows, policy=policy, batch_size=batch_size,
                              per_replica=per_replica)
    chunks = balanced_chunks([c.weight for c in ordered], n_chunks)
    chunk_flops = [max(ordered[i].prefix for i in chunk) + sum(ordered[i].suffix for i in chunk) for chunk in chunks]
    shard_tokens = [tokens * size / windows for size in shards]
    durations = [f * t / flops + tile_overhead_s for f in chunk_flops for t in shard_tokens]
    longest_first = policy == "shards" if longest_first is None else longest_first
    makespan = list_schedule(durations, replicas, longest_first=longest_first)
    longest = max(durations)
    work = max(c.prefix for c in ordered) + sum(c.suffix for c in ordered)
    tail = straggler * longest if replicas > 1 else 0.0  # one replica waits for nobody
    return StepTime(makespan + tail, work * tokens / flops / replicas, len(durations), longest)


def _split(n: int, parts: int) -> list[range]:
    """``range(n)`` in ``parts`` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(n, parts)
    edges = [0]
    for p in range(parts):
        edges.append(edges[-1] + size + (p < extra))
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def block_candidates(blocks: Sequence[tuple[int, float]], head: float, num_blocks: int, *, narrow: bool = False,
                     only: Sequence[int] | None = None, with_base: bool = False) -> list[Candidate]:
    """The candidates of a step over the current model's ``blocks``: (dense block index, FLOPs per
    token) of each block still present, in order; ``num_blocks``: the dense model's.

    A removal candidate of the ``p``-th present block needs the blocks before it as its prefix and runs
    those after it and the head; a narrowing (``narrow``) also runs its own block. ``only``: the
    positions that have a candidate (default all). ``with_base``: the base itself is scored too (a
    campaign's first step, or the dense model on held-out windows: the whole base, then the head).
    """
    prefix = [0.0]
    for _, flops in blocks:
        prefix.append(prefix[-1] + flops)
    total = prefix[-1]
    out = [Candidate(prefix[p], total - prefix[p + 1] + (blocks[p][1] if narrow else 0.0) + head,
                     num_blocks - blocks[p][0] + 1)
           for p in (range(len(blocks)) if only is None else only)]
    return out + [Candidate(total, head, 1)] if with_base else out


def block_flops(arch: Arch) -> tuple[float, float, float]:
    """(attention block, MLP block, LM head) forward FLOPs per token of the dense model."""
    return 2 * attn_params(arch, arch.num_head_units), 2 * mlp_params(arch, arch.intermediate_size), \
        2 * arch.vocab_size * arch.hidden_size


def spread(count: int, layers: int) -> set[int]:
    """``count`` of ``layers`` layers, evenly spaced: where a path's removals are assumed to be."""
    return {math.floor((i + 0.5) * layers / count) for i in range(count)} if count else set()


def model_blocks(arch: Arch, attn_removed: int, mlp_removed: int, attn_keep: float = 1.0,
                 mlp_keep: float = 1.0) -> list[tuple[int, float]]:
    """(dense block index, FLOPs per token) of the blocks of a model with that many attention and MLP
    blocks removed (spread evenly) and the rest narrowed to ``attn_keep`` / ``mlp_keep`` of their width."""
    attn, mlp, _ = block_flops(arch)
    gone = {2 * l for l in spread(attn_removed, arch.num_layers)} | \
        {2 * l + 1 for l in spread(mlp_removed, arch.num_layers)}
    return [(i, attn * attn_keep if i % 2 == 0 else mlp * mlp_keep) for i in range(arch.num_blocks) if i not in gone]


def step_candidates(arch: Arch, kind: str, attn_removed: int, mlp_removed: int, *, attn_keep: float = 1.0,
                    mlp_keep: float = 1.0, first: bool = False, top_k: int = 5) -> list[Candidate]:
    """The candidates of one step of ``kind`` from a model with those removals and widths.

    ``blocks``: every block's removal; ``mlp_width`` / ``head_units``: one narrowing per layer whose
    MLP / attention is present (``first``: a campaign's first step, the dense model is scored too); ``sprint``: one base
    pass for the hidden states (checkpoints ignored), per candidate its block and the next MLP with
    and without it, ``top_k`` refits of that MLP's down projection (Z^T Z and Z^T R: 2 w (w + H)
    FLOPs per token) each re-scored locally, and the chosen model's perplexity (one full forward).
    """
    blocks = model_blocks(arch, attn_removed, mlp_removed, attn_keep, mlp_keep)
    attn, mlp, head = block_flops(arch)
    n = arch.num_blocks
    if kind == "blocks":
        return block_candidates(blocks, head, n, with_base=first)
    if kind in ("mlp_width", "head_units"):
        parity = 1 if kind == "mlp_width" else 0
        only = [p for p, (i, _) in enumerate(blocks) if i % 2 == parity]
        return block_candidates(blocks, head, n, narrow=True, only=only, with_base=first)
    if kind != "sprint":
        raise ValueError(f"unknown step kind {kind!r}")
    total = sum(f for _, f in blocks)
    mlps = [p for p, (i, _) in enumerate(blocks) if i % 2 == 1]
    local = [(i, f + 2 * next((blocks[q][1] for q in mlps if q > p), 0.0)) for p, (i, f) in enumerate(blocks)]
    width = arch.intermediate_size * mlp_keep
    refit = 2 * width * (width + arch.hidden_size) + 3 * mlp * mlp_keep
    return ([Candidate(total, f, n - i + 1) for i, f in local] + [Candidate(total, refit, 1)] * min(top_k, len(blocks))
            + [Candidate(0.0, total + head, 1)])


def search_cost(arch: Arch, method: str, stages: tuple[list[str], int, int], mlp_group: int, tokens: int,
                window_length: int, replicas: int, flops: float, *, straggler: float, tile_overhead_s: float,
                policy: str = "scorer", batch_size: int = 4, max_steps: int | None = None, top_k: int = 5) -> PathCost:
    """Counts and seconds of a search whose ``stages`` are (kinds of the blocks removed, in order; MLP
    width steps; head-unit steps): every step's candidates from the model as it shrinks (removals
    spread evenly; width steps narrow the MLPs, then attention, that are left evenly)."""
    kinds, widths, heads = stages
    L, a, m = arch.num_layers, kinds.count("attn"), kinds.count("mlp")
    steps = [("blocks", i) for i in range(len(kinds))] + [("mlp_width", j) for j in range(widths)] + \
        [("head_units", j) for j in range(heads)]
    steps = steps[:max_steps] if max_steps is not None else steps
    engine = bound = naive = 0.0
    evaluations = 0
    for n, (kind, j) in enumerate(steps):
        if kind == "blocks":
            state = dict(attn_removed=kinds[:j].count("attn"), mlp_removed=kinds[:j].count("mlp"))
        else:
            narrowed = j if kind == "mlp_width" else widths
            mlp_keep = 1 - narrowed * mlp_group / (max(1, L - m) * arch.intermediate_size)
            attn_keep = 1 - (j if kind == "head_units" else 0) / (max(1, L - a) * arch.num_head_units)
            state = dict(attn_removed=a, mlp_removed=m, mlp_keep=max(0.0, mlp_keep), attn_keep=max(0.0, attn_keep))
        candidates = step_candidates(arch, "sprint" if method == "sprint" else kind, first=n == 0, top_k=top_k,
                                     **state)
        scored = [c for c in candidates if c.weight > 1] if method == "sprint" else candidates
        evaluations += len(scored) - (n == 0 and method != "sprint")  # the dense model is no candidate
        t = simulate_step(candidates, tokens, window_length, replicas, flops, batch_size=batch_size,
                          policy="shards" if method == "sprint" else policy,  # SPRINT's sums split by windows only
                          straggler=straggler, tile_overhead_s=tile_overhead_s)
        engine, bound = engine + t.seconds, bound + t.bound
        full = [(c.prefix + c.suffix) * tokens / flops for c in candidates]
        naive += math.nan if method == "sprint" else list_schedule(full, replicas)
    blocks_done = kinds[:sum(k == "blocks" for k, _ in steps)]
    return PathCost(len(steps), blocks_done.count("attn"), blocks_done.count("mlp"), evaluations, engine, bound,
                    naive, sum(k == "mlp_width" for k, _ in steps), sum(k == "head_units" for k, _ in steps))
