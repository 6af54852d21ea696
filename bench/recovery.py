"""Benchmark: LoRA recovery of the demo's pruned SmolLM2-135M on this machine (issue "Recovery").

    .venv/bin/python bench/recovery.py            # needs runs/demo (make demo); about 15 minutes on 2 cores

The demo's run directory is copied to ``runs/bench-recovery/demo`` (without any earlier recovery) and
recovered there with ``rayprune recover``'s code: LoRA r=16, alpha=32 on every projection (the
recipe's), trained on the TRAIN split of the run's own corpus (Wikipedia articles; the held-out
windows come from the test articles) in 256-token windows, one Ray Train worker with 2 CPU threads
in fp32. The step budget is cut to what fits about 10 minutes here (the recipe's 2 epochs of Alpaca
are hours of GPU time): 60 steps of 8 windows, lr 3e-4 after 6 warm-up steps.

The figures: held-out perplexity of dense, pruned and recovered on the demo's own 16 x 256 held-out
windows; tokens trained on; wall time; and the check that no training window shares a 32-token span
with a held-out window. Section ``<!-- recovery -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from results import write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MARKER = "<!-- recovery -->"
SETTINGS = ["data=run", "max_length=256", "val_rows=16", "batch_size=8", "grad_accum=1", "max_steps=60",
            "warmup_steps=6", "lr=3e-4", "log_every=5", "checkpoint_every=20", "workers=1", "cpus_per_worker=2"]


def overlap_check(run: Path) -> tuple[int, int]:
    """(training windows, 32-gram spans any of them shares with the held-out windows)."""
    from actors.models import load_tokenizer
    from orchestrator.data.windows import heldout_windows
    from orchestrator.eval_model import _run_evaluation
    from orchestrator.recovery_data import read_examples, shared_ngrams
    from orchestrator.rundir import RunDir

    evaluation = _run_evaluation(RunDir(run).read_config())
    heldout = heldout_windows(load_tokenizer(run / "model"), evaluation["corpus"], evaluation["sequences"],
                              evaluation["length"], evaluation["seed"])
    ids, _ = read_examples(run / "recovery" / "data" / "train.parquet")
    return len(ids), sum(shared_ngrams(x, heldout, 32) for x in ids)


def main() -> None:
    import logging

    from orchestrator.recover import recover, recovery_summary
    from orchestrator.recovery_config import load_recovery

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    demo = ROOT / "runs" / "demo"
    if not (demo / "model" / "config.json").is_file():
        raise SystemExit("runs/demo/model is missing: run `make demo` first")
    run = ROOT / "runs" / "bench-recovery" / "demo"
    if "--fresh" in sys.argv or not (run / "recovery" / "result.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(demo, run, ignore=shutil.ignore_patterns("recovery", "history"))
    start = time.perf_counter()
    result = recover(run, load_recovery(None, SETTINGS), progress=False)
    wall = time.perf_counter() - start
    print(recovery_summary(result))
    windows, shared = overlap_check(run)
    held, train, data = result["heldout"], result["train"], result["data"]
    change = 100 * (held["recovered"] - held["pruned"]) / held["pruned"]
    path = json.loads((run / "path.json").read_text())
    write_section(MARKER, [
        "## LoRA recovery of the demo's pruned SmolLM2-135M (`bench/recovery.py`)",
        "",
        f"The demo's model (ratio {path['steps'][-1]['ratio']:.4f}) fine-tuned with LoRA r=16, alpha=32 on every "
        f"q/k/v/o/gate/up/down projection, on {data['train_examples']:,} windows of 256 tokens from the train split "
        f"of the run's own corpus ({data['source']}); {train['steps']} steps of 8 windows (lr 3e-4, 6 warm-up "
        f"steps), one Ray Train worker with 2 CPU threads, fp32. Held-out: the demo's {held['windows']} x "
        f"{held['length']} windows of the Wikipedia test articles.",
        "",
        "| model | held-out perplexity |",
        "|---|---|",
        f"| dense | {held['dense']:.3f} |",
        f"| pruned (demo) | {held['pruned']:.3f} |",
        f"| recovered | {held['recovered']:.3f} ({change:+.1f}% vs pruned) |",
        "",
        f"- tokens trained on: {train['tokens_trained']:,} ({train['steps']} steps x 8 x 256); training time "
        f"{train['seconds']:.0f} s; the whole command (data, Ray Train start, training, merge, two held-out "
        f"evaluations) {wall:.0f} s",
        f"- final training loss {train['final_loss']:.4f}, validation loss {train['final_val_loss']:.4f} "
        f"({data['val_examples']} windows)",
        f"- no training window overlaps a held-out window: {shared} shared 32-token spans over {windows:,} windows "
        f"(the filter dropped {data['dropped_overlap']})",
        f"- measured {time.strftime('%Y-%m-%d')}; the loss curve is `runs/bench-recovery/demo/recovery/loss.png`",
    ])


if __name__ == "__main__":
    main()
