"""Benchmark: SPRINT's latency estimate against the measured latency of compact models.

    .venv/bin/python bench/sprint.py runs/sprint-smollm2 --steps 8 --compare runs/demo

For the run's final model, the prefixes of its path named by ``--steps`` (exported with their
refitted weights) and the final models of other runs (``--compare``, e.g. BlockPruner's), it prints
the ratio, the held-out perplexity (the run's evaluation windows), the speedup the run's latency
table estimates (with the costs the run searched with: SPRINT's sum of kept blocks, or with the fixed
part under ``search.sprint.latency_fixed``) and the speedup measured on this machine: the latency scenario of the run (prefill
of ``prompt`` tokens, LM head on the last position; decode steps if any), with the threads the
table was measured with, fastest of ``--rounds`` rounds interleaved over all models so that a busy
neighbour slows every model alike. It writes ``RUN_DIR/bench.json`` and leaves bench/RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from actors.export import load_pruned  # noqa: E402
from actors.heldout import heldout_score, perplexity  # noqa: E402
from actors.latency import measure_latency  # noqa: E402
from actors.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from orchestrator.data.windows import heldout_windows  # noqa: E402
from orchestrator.rundir import RunDir, final_mask  # noqa: E402
from orchestrator.export import export_run  # noqa: E402
from search_spaces import Arch, Mask  # noqa: E402
from search_spaces.latency import BlockCosts, LatencyTable, Scenario, speedup  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=ROOT / "runs" / "sprint-smollm2")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="path prefixes to export and measure")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other run directories (final models)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    run_dir = args.run_dir
    path = RunDir(run_dir).read_path()
    config = RunDir(run_dir).read_config()
    sprint = path["sprint"]
    table = LatencyTable.from_dict(sprint["latency"])
    scenario = Scenario(sprint["scenario"]["prompt"], sprint["scenario"]["generate"])
    # The costs the search ranked and stopped by: without the fixed part unless search.sprint.latency_fixed
    # (SPRINT's arithmetic); runs older than that setting used the table's costs as they are.
    costs = BlockCosts(**sprint["costs"]) if "costs" in sprint else table.scenario_costs(scenario)
    torch.set_num_threads(int(table.meta.get("threads") or torch.get_num_threads()))
    source = resolve_model(config["model"])
    arch = Arch.from_hf_config(load_model(source).config.to_dict())
    evaluation = config["data"]["evaluation"]
    windows = heldout_windows(load_tokenizer(source), config["data"]["corpus"], evaluation["sequences"],
                              evaluation["length"], evaluation["seed"])

    rows: dict[str, dict] = {"dense": {"dir": None, "mask": Mask(), "ratio": 0.0,
                                       "heldout": path["heldout"]["dense_ppl"]}}
    rows[f"sprint (final, step {len(path['steps'])})"] = {
        "dir": run_dir / "model", "mask": final_mask(path), "ratio": path["steps"][-1]["ratio"],
        "heldout": path["heldout"]["pruned_ppl"]}
    for k in args.steps:
        out = export_run(run_dir, step=k, out=run_dir / "bench" / f"step-{k}")
        step = path["steps"][k - 1]
        rows[f"sprint (step {k})"] = {"dir": out, "mask": Mask.from_dict(step["mask"]), "ratio": step["ratio"],
                                      "heldout": perplexity(heldout_score(load_pruned(out), windows))}
    for other in args.compare:
        other_path = RunDir(other).read_path()
        method = RunDir(other).read_config().get("search", {}).get("method", other.name)
        rows[f"{method} ({other.name})"] = {"dir": other / "model", "mask": final_mask(other_path),
                                            "ratio": other_path["steps"][-1]["ratio"],
                                            "heldout": other_path["heldout"]["pruned_ppl"]}

    models = {name: load_model(source) if row["dir"] is None else load_pruned(row["dir"]) for name, row in rows.items()}
    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            best[name] = min(best[name], measure_latency(model, scenario, repeats=1))
    lines = [f"Latency: {scenario}, fp32, {torch.get_num_threads()} threads, fastest of {args.rounds} interleaved "
             f"rounds; estimate from {run_dir / 'sprint' / 'latency.json'} ({table.device}).", "",
             "| model | ratio | held-out ppl | est. speedup | measured | measured speedup | estimate error |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    results = {}
    for name, row in rows.items():
        est = speedup(row["mask"], arch, costs)
        measured = best["dense"] / best[name]
        results[name] = {"ratio": row["ratio"], "heldout_ppl": row["heldout"], "estimated_speedup": est,
                         "measured_seconds": best[name], "measured_speedup": measured}
        lines.append(f"| {name} | {row['ratio']:.4f} | {row['heldout']:.3f} | {est:.3f}x | {best[name] * 1e3:.0f} ms "
                     f"| {measured:.3f}x | {(est / measured - 1) * 100:+.1f}% |")
    print("\n".join(lines))
    (run_dir / "bench.json").write_text(json.dumps({"scenario": vars(scenario), "threads": torch.get_num_threads(),
                                                    "rounds": args.rounds, "models": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
