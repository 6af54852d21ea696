"""Benchmark: BlockPruner vs MultiPruner campaigns on SmolLM2-135M, and what their models cost.

    make bench            # or: .venv/bin/python bench/campaigns.py

Both campaigns start cold (fresh run directories) with the same calibration windows
(configs/demo.yaml's data section), one after the other on this machine. MultiPruner's target is
BlockPruner's final ratio, so the held-out perplexities are compared at the same ratio. Then the
compact exports are measured against the dense model: size on disk, and prefill latency of
1 x 512 tokens (fastest of 9 rounds interleaved over the three models, so that a busy neighbour
slows all alike). SPRINT is compared with BlockPruner by bench/sprint_vs_blockpruner.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from actors.export import load_pruned
from actors.latency import measure_latency
from actors.models import load_model, resolve_model
from orchestrator.campaign import Campaign
from orchestrator.config_load import load_config
from orchestrator.report import step_label
from orchestrator.rundir import RunDir
from results import write_section
from search_spaces.latency import Scenario

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- campaigns -->"
ROUNDS = 9


def run(method: str, target: float, extra: list[str] = ()) -> dict:
    run_dir = ROOT / "runs" / f"bench-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)  # cold: nothing cached
    overrides = [f"name=bench-{method}", f"search.method={method}", f"search.target_ratio={target}",
                 f"output={run_dir}", *extra]
    t0 = time.perf_counter()
    result = Campaign(load_config(ROOT / "configs" / "demo.yaml", overrides), progress=False).run()
    path = RunDir(result.run_dir).read_path()
    path["wall"] = time.perf_counter() - t0
    path["run_dir"] = result.run_dir
    return path


def size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def prefill_latencies(models: dict, rounds: int = ROUNDS) -> dict[str, float]:
    """Fastest prefill (1 x 512 tokens) of each model over ``rounds`` rounds interleaved over all."""
    best = {name: float("inf") for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            best[name] = min(best[name], measure_latency(model, Scenario(512, 0), repeats=1))
    return best


def main() -> None:
    torch.set_num_threads(2)
    block = run("blockpruner", 0.10)
    multi = run("multipruner", round(block["steps"][-1]["ratio"], 4), ["search.split=30:60:10", "search.mlp_group=256"])
    dense_dir = resolve_model("smollm2-135m")
    models = {"dense": load_model(dense_dir)}
    sizes = {"dense": size_on_disk(dense_dir)}
    for name, path in (("blockpruner", block), ("multipruner", multi)):
        models[name] = load_pruned(path["run_dir"] / "model")
        sizes[name] = size_on_disk(path["run_dir"] / "model")
    latency = prefill_latencies(models)
    write_results(block, multi, latency, sizes)


def write_results(block: dict, multi: dict, latency: dict, sizes: dict) -> None:
    def kinds(path: dict) -> str:
        names = {"attn": "attn", "mlp": "MLP", "mlp_width": "MLP-width", "attn_width": "head-unit"}
        counts: dict[str, int] = {}
        for s in path["steps"]:
            counts[s["kind"]] = counts.get(s["kind"], 0) + 1
        return ", ".join(f"{n} {names[k]}" for k, n in counts.items())

    def row(name: str, path: dict | None) -> str:
        key = name.split(" ")[0].lower()
        if path is None:
            return (f"| dense | 0.0000 | {block['heldout']['dense_ppl']:.3f} | {sizes['dense'] / 2**20:.0f} MiB | "
                    f"{latency['dense'] * 1000:.0f} ms | 1.000x | - | - |")
        return (f"| {name} ({kinds(path)}) | {path['steps'][-1]['ratio']:.4f} | {path['heldout']['pruned_ppl']:.3f} | "
                f"{sizes[key] / 2**20:.0f} MiB | {latency[key] * 1000:.0f} ms | {latency['dense'] / latency[key]:.3f}x | "
                f"{path['wall']:.0f} s | {path['evaluations']['evaluated']:,} |")

    write_section(MARKER, [
        "## BlockPruner vs MultiPruner on SmolLM2-135M (`bench/campaigns.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, this machine (2 cores), both campaigns cold with configs/demo.yaml's data "
        f"(2 x 128 calibration tokens of the wikipedia train split, seed 0; held-out 16 x 256 tokens of the test "
        f"split) and its 2 CPU evaluators. MultiPruner (split 30:60:10, MLP group 256, head group 1) targets "
        f"BlockPruner's final ratio. Latency: prefill of 1 x 512 tokens on the compact models (stock transformers "
        f"classes, `load_pruned`), {torch.get_num_threads()} threads, fp32, fastest of {ROUNDS} interleaved rounds. "
        f"Wall time: everything from start to the written run directory.",
        "",
        "| model | ratio | held-out ppl | safetensors | prefill | speedup | campaign wall time | evaluations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row("dense", None), row("BlockPruner", block), row("MultiPruner", multi),
        "",
        "MultiPruner's path (calibration perplexity after each step):",
        "",
        " -> ".join(f"{step_label(s)} ({s['ppl']:.2f})" for s in multi["steps"]),
    ])


if __name__ == "__main__":
    main()
