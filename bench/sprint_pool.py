"""Benchmark: a SPRINT campaign on 1 and on 2 evaluator actors (1 CPU each), same decisions.

    make bench            # or: .venv/bin/python bench/sprint_pool.py

Issue #12: SPRINT ran a whole step as one remote call, so it never used more than one replica.
Now a step is spread over the pool (orchestrator/sprint_pool.py): one window shard per replica,
sums added on the driver. configs/sprint-smollm2.yaml with 8 x 128 calibration tokens (batch 2),
8 x 128 held-out tokens, ``search.max_steps=4``, cold run directories, each campaign alone on this
machine. Every SPRINT call an evaluator answers is logged with its start and end (an Evaluator
subclass); a replica's busy fraction = its calls' seconds / the span from the first call's start to
the last call's end (the search and held-out scoring; model loading is before it). Section
``<!-- sprint_pool -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from actors.evaluator import Evaluator
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- sprint_pool -->"


class Timed(Evaluator):
    """Logs every SPRINT call (worker, method, phase, start, end) to ``log_file`` (one JSON line each)."""

    log_file: str = ""

    def _log(self, method: str, phase: str | None, t0: float) -> None:
        line = json.dumps({"worker": self.worker, "method": method, "phase": phase, "start": t0, "end": time.time()})
        with open(self.log_file, "a") as handle:
            handle.write(line + "\n")

    def sprint_step(self, request, sources):
        t0 = time.time()
        try:
            return super().sprint_step(request, sources)
        finally:
            self._log("sprint_step", None, t0)

    def sprint_shard(self, phase, request, *args):
        t0 = time.time()
        try:
            return super().sprint_shard(phase, request, *args)
        finally:
            self._log("sprint_shard", phase, t0)

    def sprint_solve(self, request, sources, block, moments):
        t0 = time.time()
        try:
            return super().sprint_solve(request, sources, block, moments)
        finally:
            self._log("sprint_solve", None, t0)


def campaign(actors: int, log_dir: Path) -> dict:
    from orchestrator.campaign import Campaign
    from orchestrator.config_load import load_config
    from orchestrator.rundir import RunDir

    run_dir = ROOT / "runs" / f"bench-sprint-pool-{actors}"
    shutil.rmtree(run_dir, ignore_errors=True)
    log_file = log_dir / f"calls-{actors}.jsonl"
    overrides = [f"name=bench-sprint-pool-{actors}", f"output={run_dir}", "search.max_steps=4", "search.batch_size=2",
                 "data.calibration={sequences: 8, length: 128, seed: 0}", "data.evaluation={sequences: 8, length: 128}",
                 f"cluster.actors={actors}", "cluster.cpus_per_actor=1"]
    config = load_config(ROOT / "configs" / "sprint-smollm2.yaml", overrides)
    timed = type("TimedEvaluator", (Timed,), {"log_file": str(log_file)})
    t0 = time.perf_counter()
    result = Campaign(config, progress=False, evaluator_cls=timed).run()
    wall = time.perf_counter() - t0
    calls = [json.loads(line) for line in log_file.read_text().splitlines()]
    start, end = min(c["start"] for c in calls), max(c["end"] for c in calls)
    busy: dict[str, float] = defaultdict(float)
    for c in calls:
        busy[c["worker"]] += c["end"] - c["start"]
    path = RunDir(result.run_dir).read_path()
    return {"actors": actors, "wall": wall, "span": end - start, "busy": sorted(busy.values(), reverse=True),
            "calls": len(calls), "steps": [(s["kind"], s["layer"]) for s in path["steps"]],
            "ppl": [s["ppl"] for s in path["steps"]], "heldout": path["heldout"]["pruned_ppl"]}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        one = campaign(1, Path(tmp))
        two = campaign(2, Path(tmp))
    for r in (one, two):
        print(f"{r['actors']} actor(s): span {r['span']:.1f} s, busy " + ", ".join(f"{b / r['span']:.2f}" for b in r["busy"])
              + f", path {r['steps']}, held-out {r['heldout']:.3f}")
    write_results(one, two)


def write_results(one: dict, two: dict) -> None:
    same = one["steps"] == two["steps"]
    worst = max(abs(a / b - 1) for a, b in zip(two["ppl"] + [two["heldout"]], one["ppl"] + [one["heldout"]]))
    lines = ["## SPRINT on 1 and 2 actors (`bench/sprint_pool.py`)", "",
             f"configs/sprint-smollm2.yaml, 8 x 128 calibration tokens (batch 2), 8 x 128 held-out, "
             f"search.max_steps=4, actors x 1 CPU, fp32, cold run directories, {time.strftime('%Y-%m-%d')}, "
             f"this machine ({os.cpu_count()} cores). Span: first SPRINT call's start to the last one's end "
             f"(model loading and the latency table excluded); busy = a replica's call seconds / span.", "",
             "| actors | calls | span | campaign wall | busy per replica | held-out ppl |", "|---:|---:|---:|---:|---|---:|"]
    for r in (one, two):
        lines.append(f"| {r['actors']} | {r['calls']} | {r['span']:.1f} s | {r['wall']:.1f} s | "
                     + ", ".join(f"{b / r['span']:.2f}" for b in r["busy"]) + f" | {r['heldout']:.3f} |")
    lines += ["", f"2 actors: {one['span'] / two['span']:.2f}x the speed of 1 on the SPRINT calls; path "
              f"{'identical' if same else 'DIFFERENT'} ({', '.join(f'{k}{l}' for k, l in one['steps'])}), perplexities "
              f"within {worst:.1e} relative. One actor runs each step as one call; two run it in phases "
              "(scores, moments, solves, re-scores) on one window shard each, every phase on the replica that "
              "holds its shard's streams; what keeps it from 2x is a round trip per phase, the refit sums' "
              "transfer (float64, top_k x (w^2 + w H) per shard) and the solves (top_k per step, spread over "
              "the replicas)."]
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
