"""The plan's table for Llama-2-7B and Llama-2-70B (BlockPruner, MultiPruner, SPRINT on 8 and 64 GPUs).

    .venv/bin/python bench/plan_table.py

Pure arithmetic (cluster/plan.py, no torch, under a second): it replaces the `<!-- plan -->`
section of bench/RESULTS.md with :func:`cluster.plan.reference_table` and its assumptions. The
figures are predictions, not measurements; bench/plan_vs_measured.py checks the model on this
machine against real campaigns.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cluster.plan import REFERENCE_MODELS, Hardware, plan_campaign, reference_table  # noqa: E402
from cluster.plan_dispatch import simulate_step, step_candidates  # noqa: E402
from results import write_section  # noqa: E402
from search_spaces import Arch  # noqa: E402

MARKER = "<!-- plan -->"


def first_step(model: str, replicas: int) -> str:
    """Step 1 at 262,144 tokens: chunks only (as dispatched before issue #12) against window shards."""
    arch, hw = Arch.from_hf_config(REFERENCE_MODELS[model]), Hardware()
    candidates = step_candidates(arch, "blocks", 0, 0)
    flops = hw.tflops * 1e12
    old = simulate_step(candidates, 262144, 2048, replicas, flops, policy="chunks", straggler=0, tile_overhead_s=0)
    scorer, shards = (simulate_step(candidates, 262144, 2048, replicas, flops, policy=policy, straggler=hw.straggler,
                                    tile_overhead_s=hw.tile_overhead_s) for policy in ("scorer", "shards"))
    return (f"{model} on {replicas} replicas: chunks only, no allowances {old.seconds:,.0f} s; the scorer's tiles "
            f"{scorer.seconds:,.0f} s; windows first {shards.seconds:,.0f} s (both with the straggler allowance and "
            f"tile overhead); balanced bound {shards.bound:,.0f} s")


def calibration() -> str:
    """The 35 TFLOPS default against BlockPruner's reported cost of Llama-2-7B at 22% (SPEC §2)."""
    arch = Arch.from_hf_config(REFERENCE_MODELS["llama2-7b"])
    plan = plan_campaign(arch, "llama2-7b", "blockpruner", 0.22, 65536, 1, Hardware())
    return (f"Calibration: Llama-2-7B BlockPruner to 22% with the naive loop on one GPU is planned at "
            f"{plan.hours_naive:.1f} GPU-hours and {plan.evaluations:,} evaluations (middle mix) against the paper's "
            f"5.5 GPU-hours and about 1,000 evaluations: at 35 effective TFLOPS the plan is about "
            f"{plan.hours_naive / 5.5 - 1:.0%} slower than the paper's GPUs.")


def main() -> None:
    write_section(MARKER, [
        "## Predicted wall times at scale (`bench/plan_table.py`: `rayprune plan`'s model, cluster/plan.py)",
        "",
        "With the tiling orchestrator/scorer.py uses today (2 mask chunks per replica; window shards only when "
        "a step has fewer candidates than that):",
        "",
        reference_table(),
        "",
        "With windows-first tiles (`rayprune plan --tiling shards`: 2 window shards per replica, masks chunked "
        "only when windows run out, longest first): what the same campaigns would take if the scorer cut "
        "tiles that way (sharding adds no work; a chunk reruns its prefix):",
        "",
        reference_table(Hardware(tiling="shards")),
        "",
        "How to read it. *steps*: the middle estimate and, in brackets, the fewest (largest blocks first) and "
        "most (smallest first) that a greedy path can take; MultiPruner: block steps + MLP width steps + head-unit "
        "steps. *attention + MLP blocks*: what the middle, fewest and most paths remove (never more attention "
        "blocks than layers). *engine*: the search with every step dispatched as tiles of (mask chunk x window "
        "shard) on the replicas, for the middle path (in brackets: the least and most of the three mixes); SPRINT's "
        "steps are split by window shards in both tables; *balanced bound*: every step's work divided "
        "evenly, what no dispatch can beat. *load, restarts*: process start and weights read from shared storage "
        "before the first step, and the expected restarts. *total*: load, restarts, search, held-out (dense and "
        "pruned) and export, for the middle path (the least-most of the three mixes).",
        "",
        "Against the plan before issue #12: replicas now fill nodes (Llama-2-70B, k = 3 on 8-GPU nodes: 16 "
        "replicas on 64 GPUs, not 21); the block mix follows the block sizes (under GQA an attention block of "
        "Llama-2-70B is 151M parameters, an MLP block 705M: 22 to 85 steps, not '36 (22-101)'); each tile pays "
        "its own prefix (the old plan charged step 1 of Llama-2-7B at 262k tokens on 16 replicas 254 s, and "
        "Llama-2-70B on 21 replicas 4,688 s: tests/cluster/test_plan.py); loading, restarts, held-out evaluation "
        "and export are counted. Step 1 at 262,144 tokens, simulated:",
        "",
        f"- {first_step('llama2-7b', 16)}",
        f"- {first_step('llama2-70b', 21)}",
        f"- {first_step('llama2-70b', 16)}",
        "",
        calibration(),
    ])


if __name__ == "__main__":
    main()
