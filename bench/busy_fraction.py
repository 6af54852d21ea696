"""Benchmark: a step with fewer candidates than actors, with and without window shards.

    make bench            # or: .venv/bin/python bench/busy_fraction.py

Late in a greedy search, or when scoring held-out figures, a step may have fewer masks than the
pool has replicas. Issue #12: every replica must still work. Two 1-CPU evaluator actors score one
candidate (SmolLM2-135M without attention block 20, from the dense base) on 16 x 128 calibration
tokens, twice, dispatched as the scorer dispatches it:

- chunks only (before window shards): one task, on one actor;
- window shards (``search_spaces.tiling.window_shards``, batch 4): the windows cut at batch
  boundaries into one tile per shard, and the shards' NLL sums added up.

Busy fraction of a replica = the seconds its tasks report / the step's wall time. Model loading is
not timed. Section ``<!-- busy_fraction -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict

from results import write_section

MARKER = "<!-- busy_fraction -->"
BATCH = 4


def main() -> None:
    import ray

    from actors.models import load_tokenizer, resolve_model
    from cluster.session import connect, start_evaluators
    from orchestrator.data.corpus import load_documents
    from orchestrator.data.windows import token_windows
    from orchestrator.dispatch import Dispatcher, Task
    from search_spaces import Block, Mask
    from search_spaces.tiling import window_shards

    path = resolve_model("smollm2-135m")
    windows = token_windows(load_tokenizer(path), load_documents("wikipedia", "train"), 16, 128, seed=0)
    candidate, base = Mask().remove(Block(20, "attn")).to_json(), Mask().to_json()
    connect(num_cpus=os.cpu_count())
    actors = start_evaluators(2, 1, 0, model="smollm2-135m", windows={"calibration": windows}, batch_size=BATCH)
    workers = [info["worker"] for info in ray.get([a.info.remote() for a in actors])]  # loaded
    warm = [Task("calibration", [candidate], base, rows=(i * BATCH, (i + 1) * BATCH)) for i in range(2)]
    list(Dispatcher(actors).run(warm))  # one small task each: the first forward is not timed either
    rows = []
    for name, ranges in (("chunks only", [None]), ("window shards", window_shards(len(windows), BATCH, 1, 2))):
        tasks = [Task("calibration", [candidate], base, rows=r) for r in ranges]
        t0 = time.perf_counter()
        outcomes = list(Dispatcher(actors).run(tasks))
        wall = time.perf_counter() - t0
        busy: dict[str, float] = defaultdict(float)
        for outcome in outcomes:
            for row in outcome.rows:
                busy[row["worker"]] += row["seconds"]
        nll = math.fsum(row["nll_sum"] for o in outcomes for row in o.rows)
        tokens = sum(row["tokens"] for o in outcomes for row in o.rows)
        rows.append((name, len(tasks), wall, [busy[w] / wall for w in workers], nll, tokens))
        print(f"{name}: {len(tasks)} tile(s), {wall:.1f} s, busy " + ", ".join(f"{busy[w] / wall:.2f}" for w in workers))
    actors.shutdown()
    ray.shutdown()
    write_results(rows)


def write_results(rows) -> None:
    (_, _, wall0, _, nll0, tokens0), (_, _, wall1, _, nll1, tokens1) = rows
    lines = ["## A step with fewer candidates than actors (`bench/busy_fraction.py`)", "",
             f"One candidate (SmolLM2-135M without attn20, from the dense base), 16 x 128 calibration tokens, "
             f"2 evaluator actors x 1 CPU, fp32, {time.strftime('%Y-%m-%d')}, 2 cores. Busy = seconds reported "
             f"by a replica's tasks / the step's wall time.", "",
             "| dispatch | tiles | wall | busy, replica 1 | busy, replica 2 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {tiles} | {wall:.1f} s | {busy[0]:.2f} | {busy[1]:.2f} |" for name, tiles, wall, busy, _, _
              in rows]
    lines += ["", f"Window shards: {wall0 / wall1:.2f}x faster, and the same score (NLL {nll1:.4f} vs {nll0:.4f}, "
              f"relative difference {abs(nll1 / nll0 - 1):.1e}; {tokens1} tokens both). Each shard runs its own dense "
              "prefix, but on its own windows, so sharding adds no work."]
    assert tokens0 == tokens1
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
