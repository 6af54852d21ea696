"""How a step's work is cut into tiles of (mask chunk x window shard): one rule for the scorer that
does it (``orchestrator/scorer.py``) and the plan that predicts it (``cluster/plan_dispatch.py``).

Pure arithmetic: no torch, no Ray.
"""

from __future__ import annotations

from typing import Sequence


def balanced_chunks(costs: Sequence[float], n_chunks: int) -> list[list[int]]:
    """Split items (kept in order) into at most ``n_chunks`` contiguous runs of similar total cost."""
    if not costs:  # nothing to do: no chunk at all (an empty task would still occupy an actor)
        return []
    n_chunks = max(1, min(n_chunks, len(costs)))
    target = sum(costs) / n_chunks
    chunks: list[list[int]] = [[]]
    acc = 0.0
    for i, cost in enumerate(costs):
        remaining_items, remaining_chunks = len(costs) - i, n_chunks - len(chunks)
        if chunks[-1] and (acc + cost / 2 > target or remaining_items <= remaining_chunks) and remaining_chunks > 0:
            chunks.append([])
            acc = 0.0
        chunks[-1].append(i)
        acc += cost
    return chunks


def window_shards(n_windows: int, batch_size: int, n_chunks: int, n_actors: int) -> list[tuple[int, int]]:
    """Window ranges ``[start, stop)`` covering ``n_windows`` windows, cut at multiples of
    ``batch_size`` (never less than one batch), so that ``n_chunks`` mask chunks make at least two
    tiles per actor; one range (all windows) with one actor or enough chunks.

    Two tiles per actor is the granularity a step with many masks already has (2 chunks per actor):
    greedy dispatch then keeps every actor busy while tiles are queued, and the last round is short.
    """
    if n_windows < 1 or batch_size < 1:
        raise ValueError(f"window_shards needs windows and a batch size >= 1 (got {n_windows}, {batch_size})")
    batches = -(-n_windows // batch_size)
    shards = 1 if n_actors < 2 or n_chunks < 1 else min(batches, max(1, -(-2 * n_actors // n_chunks)))
    cuts = [batch_size * (batches * i // shards) for i in range(shards)] + [n_windows]
    return list(zip(cuts[:-1], cuts[1:]))
