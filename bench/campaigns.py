"""Benchmark: BlockPruner vs MultiPruner campaigns on SmolLM2-135M, and what their models cost.

    make bench            # or: .venv/bin/python bench/campaigns.py

Both campaigns use the same calibration windows (configs/demo.yaml's data section) in one run on
this machine. MultiPruner's target is BlockPruner's final ratio, so the held-out perplexities are
compared at the same ratio. Then the compact exports are measured: size on disk and forward
latency (prefill of 1 x 512 tokens, median of 5) against the dense model.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from actors.export import load_pruned
from actors.models import load_model, resolve_model
from orchestrator.campaign import Campaign
from orchestrator.config import load_config
from orchestrator.report import step_label
from results import write_section

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- campaigns -->"


def run(method: str, target: float, extra: list[str] = ()) -> dict:
    overrides = [f"name=bench-{method}", f"search.method={method}", f"search.target_ratio={target}",
                 f"output={ROOT / 'runs' / ('bench-' + method)}", *extra]
    t0 = time.perf_counter()
    result = Campaign(load_config(ROOT / "configs" / "demo.yaml", overrides), progress=False).run()
    path = json.loads((result.run_dir / "path.json").read_text())
    path["wall"] = time.perf_counter() - t0
    path["run_dir"] = result.run_dir
    return path


def size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def prefill_latency(model, tokens: int = 512, repeats: int = 5) -> float:
    ids = torch.randint(0, 49152, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(ids, use_cache=False)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    block = run("blockpruner", 0.10)
    multi = run("multipruner", round(block["steps"][-1]["ratio"], 4), ["search.split=30:60:10", "search.mlp_group=256"])
    dense_dir = resolve_model("smollm2-135m")
    latency = {"dense": prefill_latency(load_model(dense_dir))}
    sizes = {"dense": size_on_disk(dense_dir)}
    for name, path in (("blockpruner", block), ("multipruner", multi)):
        latency[name] = prefill_latency(load_pruned(path["run_dir"] / "model"))
        sizes[name] = size_on_disk(path["run_dir"] / "model")
    write_results(block, multi, latency, sizes)


def write_results(block: dict, multi: dict, latency: dict, sizes: dict) -> None:
    def row(name: str, path: dict | None) -> str:
        if path is None:
            return (f"| dense | 0.0000 | {path_ppl(None):s} | {sizes['dense'] / 2**20:.0f} MiB | "
                    f"{latency['dense'] * 1000:.0f} ms | 1.00x |")
        last = path["steps"][-1]
        return (f"| {name} | {last['ratio']:.4f} | {path['heldout']['pruned_ppl']:.3f} | "
                f"{sizes[name] / 2**20:.0f} MiB | {latency[name] * 1000:.0f} ms | "
                f"{latency['dense'] / latency[name]:.2f}x |")

    def path_ppl(_):
        return f"{block['heldout']['dense_ppl']:.3f}"

    kinds = {}
    for s in multi["steps"]:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    lines = [
        "## BlockPruner vs MultiPruner on SmolLM2-135M (`bench/campaigns.py`)",
        "",
        f"Same calibration (2 x 128 tokens of wikipedia train, seed 0), held-out 16 x 256 tokens of wikipedia test, "
        f"2 CPU evaluators, {time.strftime('%Y-%m-%d')}. MultiPruner (split 30:60:10, MLP group 256, head group 1) "
        f"targets BlockPruner's final ratio. Latency: prefill of 1 x 512 tokens, median of 5, 2 threads, fp32.",
        "",
        "| model | ratio | held-out ppl | safetensors | prefill latency | speedup |",
        "|---|---:|---:|---:|---:|---:|",
        row("dense", None), row("blockpruner", block), row("multipruner", multi),
        "",
        f"Campaign wall time: BlockPruner {block['wall']:.0f} s ({block['evaluations']['evaluated']} evaluations), "
        f"MultiPruner {multi['wall']:.0f} s ({multi['evaluations']['evaluated']} evaluations).",
        "",
        f"MultiPruner's path ({', '.join(f'{n} {k}' for k, n in kinds.items())} steps):",
        "",
        " -> ".join(f"{step_label(s)} ({s['ppl']:.2f})" for s in multi["steps"]),
    ]
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
