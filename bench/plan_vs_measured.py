"""Benchmark: `rayprune plan`'s prediction against the same campaigns measured on this machine.

    .venv/bin/python bench/plan_vs_measured.py        # about 6 minutes on 2 cores; run it on a quiet machine

Issue #12 wants the plan within 25% of a measured SmolLM2 campaign with 1 and with 2 actors x 1 CPU.

1. Calibrate (what `--fp32-tflops` and `--read-gb-s` stand for on a CPU): the lean forward of
   SmolLM2-135M (LeanDecoder: embedding, every block, final norm, LM head and loss) in fp32 on one
   thread, on the campaign's own calibration windows, timed alone and while the other core runs the
   same forward (two processes at once: what each of two 1-CPU actors gets); its rate in the plan's
   FLOP terms (2 x parameters of the blocks and the head per token) is the effective rate. And the
   seconds to load the weights (after the imports), as a read rate.
2. Predict with the plan's own arithmetic (:func:`cluster.plan.plan_search`, as `rayprune plan`
   does; the equivalent command is written with the results): configs/demo.yaml cut to
   ``search.max_steps=4`` and 8 held-out windows, on 1 and 2 "GPUs" of one 2-"GPU" node, fp32,
   no restarts expected (``--reloads 0``), every other assumption at its default (30 s start, 0.1 s
   per tile, 20% straggler allowance with 2 replicas).
3. Measure: the same campaigns, cold (fresh temporary run directories), through
   ``orchestrator.campaign.Campaign`` with the progress bar off, wall time from start to the
   written run directory.
The ratios go to bench/RESULTS.md (section ``<!-- plan_vs_measured -->``).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import write_section  # noqa: E402

MARKER = "<!-- plan_vs_measured -->"
CONFIG = ROOT / "configs" / "demo.yaml"
OVERRIDES = ["search.max_steps=4", "data.evaluation.sequences=8", "cluster.cpus_per_actor=1"]
ACTORS = (1, 2)
REPEATS = 5


def _time_forward(barrier, queue) -> None:
    """In a fresh process on one thread: (seconds to load the weights, median seconds of a forward)."""
    import torch

    torch.set_num_threads(1)
    from actors.forward import LeanDecoder
    from actors.models import load_model, resolve_model
    from orchestrator.config_load import load_config
    from orchestrator.data.campaign_windows import campaign_windows
    from search_spaces import Arch, Mask

    config = load_config(CONFIG, OVERRIDES)
    windows = torch.as_tensor(campaign_windows(config)["calibration"])
    path = resolve_model(config.model)
    t0 = time.perf_counter()
    model = load_model(path)
    load_s = time.perf_counter() - t0
    decoder = LeanDecoder(model, Arch.from_hf_config(model.config.to_dict()))
    batch = windows[: config.search.batch_size]
    seconds = []
    with torch.inference_mode():
        decoder.nll(decoder.run(decoder.embed(batch), Mask()), batch)  # warm-up
        if barrier is not None:
            barrier.wait()  # both processes time their forwards together
        for _ in range(REPEATS):
            t1 = time.perf_counter()
            decoder.nll(decoder.run(decoder.embed(batch), Mask()), batch)
            seconds.append(time.perf_counter() - t1)
    queue.put((load_s, statistics.median(seconds), int(batch.numel())))


def calibrate(concurrent: int) -> tuple[float, float, int]:
    """(load seconds, forward seconds, tokens per forward) with ``concurrent`` processes at once."""
    ctx = mp.get_context("spawn")
    barrier, queue = (ctx.Barrier(concurrent) if concurrent > 1 else None), ctx.Queue()
    procs = [ctx.Process(target=_time_forward, args=(barrier, queue)) for _ in range(concurrent)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return (statistics.mean(r[0] for r in results), statistics.mean(r[1] for r in results), results[0][2])


def predict(config, actors: int, load_s: float, forward_s: float, tokens: int) -> tuple[object, str, float]:
    """The plan of ``config`` on ``actors`` 1-CPU replicas, the `rayprune plan` command that prints it
    (a CPU replica runs fp32: the CLI plans ``auto`` as a GPU's bf16, so the command says so), and the
    effective TFLOPS it used."""
    from actors.models import read_model_config
    from cluster.plan import Hardware, plan_search
    from cluster.plan_dispatch import block_flops
    from search_spaces import Arch, dense_params

    arch = Arch.from_hf_config(read_model_config(config.model))
    attn, mlp, head = block_flops(arch)
    tflops = (arch.num_layers * (attn + mlp) + head) * tokens / forward_s / 1e12
    read_gb_s = dense_params(arch) * 4 / load_s / 1e9
    hw = Hardware(fp32_tflops=tflops, gpus_per_node=2, gpu_memory_gb=100.0, read_gb_s=read_gb_s, reloads=0)
    cal, ev = config.data.calibration, config.data.evaluation
    plans, _ = plan_search(arch, config.model, config.search, cal.sequences * cal.length, [actors], hw,
                           replica_gpus=1, dtype="float32", window_length=cal.length,
                           eval_tokens=ev.sequences * ev.length, eval_length=ev.length)
    command = (f"rayprune plan configs/demo.yaml {' '.join(OVERRIDES)} dtype=float32 --gpus {actors} "
               f"--gpus-per-node 2 --gpu-memory-gb 100 --fp32-tflops {tflops:.4f} --read-gb-s {read_gb_s:.3f} "
               f"--reloads 0")
    return plans[0], command, tflops


def measure(actors: int, workdir: Path) -> tuple[float, dict]:
    from orchestrator.campaign import Campaign
    from orchestrator.config_load import load_config

    run_dir = workdir / f"run-{actors}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(CONFIG, [*OVERRIDES, f"name=plan-vs-measured-{actors}", f"output={run_dir}",
                                  f"cluster.actors={actors}"])
    t0 = time.perf_counter()
    result = Campaign(config, progress=False).run()
    return time.perf_counter() - t0, {"evaluated": result.counters.evaluated, "steps": len(result.searcher.path)}


def main() -> None:
    from orchestrator.config_load import load_config

    config = load_config(CONFIG, OVERRIDES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayprune-plan-vs-measured-") as tmp:
        for actors in ACTORS:
            load_s, forward_s, tokens = calibrate(actors)
            plan, command, tflops = predict(load_config(CONFIG, [*OVERRIDES, f"cluster.actors={actors}"]), actors, load_s,
                                    forward_s, tokens)
            print(f"{actors} actor(s): predicted {plan.total_s():.0f} s ({command})", flush=True)
            wall, counts = measure(actors, Path(tmp))
            print(f"{actors} actor(s): measured {wall:.0f} s", flush=True)
            rows.append((actors, forward_s, tflops, plan, command, wall, counts))
    write_results(config, rows)


def write_results(config, rows) -> None:
    lines = [
        "## `rayprune plan` against measured campaigns (`bench/plan_vs_measured.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, this machine (2 cores). configs/demo.yaml with {', '.join(OVERRIDES)}: "
        f"BlockPruner on SmolLM2-135M, {config.data.calibration.sequences} x {config.data.calibration.length} "
        f"calibration tokens, {config.data.evaluation.sequences} x {config.data.evaluation.length} held-out, "
        f"cold run directories. The plan is calibrated with the lean forward's rate on one thread (alone for 1 "
        f"actor, with the other core busy for 2) and the model's load time, measured before the campaigns; "
        f"every other assumption at the plan's default (30 s start, 0.1 s per tile, 20% straggler allowance with "
        f"2 replicas), no restart expected.",
        "",
        "| actors x CPUs | forward (s) | effective GFLOPS | predicted: load, search, held-out, export | "
        "predicted | measured | measured / predicted | evaluations (plan / run) |",
        "|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for actors, forward_s, tflops, plan, command, wall, counts in rows:
        mid = plan.paths["middle"]
        lines.append(
            f"| {actors} x 1 | {forward_s:.2f} | {tflops * 1000:.0f} | {plan.load_s:.0f} s, {mid.engine_s:.0f} s, "
            f"{plan.heldout_s:.0f} s, {plan.export_s:.0f} s | {plan.total_s():.0f} s | {wall:.0f} s | "
            f"{wall / plan.total_s():.2f} | {mid.evaluations} + dense + 2 held-out / {counts['evaluated']} |")
    worst = max(abs(wall / plan.total_s() - 1) for _, _, _, plan, _, wall, _ in rows)
    lines += ["", f"Largest deviation: {worst:.0%} (issue #12 asks for 25% at most). The same predictions from "
                  "the command line:", "", "```text", *(row[4] for row in rows), "```"]
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
