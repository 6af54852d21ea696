"""Benchmark: racing vs exact BlockPruner steps on SmolLM2-135M, and evolution from the greedy mask.

    make bench            # or: .venv/bin/python bench/racing.py

Issue "Search beyond greedy": racing must take the same path as exact BlockPruner on fixed windows
and forward at least 3x fewer tokens. configs/demo.yaml with 32 x 128 calibration tokens (4,096;
batch 2), ``search.max_steps=3``, 2 evaluator actors x 1 CPU, cold run directories, one after the
other:

- exact: every candidate on all 32 windows;
- racing: every candidate on the first 4 windows, the best 3 (and any within the margin) and the
  probe (the best candidate cut) on all 32;
- only if racing took another path, racing with ``audit``: the exact step too, and every decision
  racing changed with what it cost.

Forwarded tokens are read from each run's cache (calibration rows, whole set and segments), so they
count what the evaluators computed. Section ``<!-- racing -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from results import write_section

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- racing -->"
SEQUENCES, ROUND1 = 32, 4
COMMON = [f"data.calibration={{sequences: {SEQUENCES}, length: 128, seed: 0}}", "search.batch_size=2",
          "search.max_steps=3", "export=false"]


def campaign(name: str, extra: list[str]) -> dict:
    from orchestrator.cache import EvalCache
    from orchestrator.campaign import Campaign
    from orchestrator.config_load import load_config

    run_dir = ROOT / "runs" / f"bench-racing-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(ROOT / "configs" / "demo.yaml", [f"name=bench-racing-{name}", f"output={run_dir}",
                                                            *COMMON, *extra])
    t0 = time.perf_counter()
    result = Campaign(config, progress=False).run()
    wall = time.perf_counter() - t0
    path = json.loads((run_dir / "path.json").read_text())
    held = 16 * 255  # tokens of a held-out row (16 x 256 windows)
    tokens = sum(int(r["tokens"]) for r in EvalCache(run_dir / "evals", flush_every=None).rows()
                 if int(r["tokens"]) != held)
    search = json.loads((run_dir / "search.json").read_text()).get("racing") if (run_dir / "search.json").exists() else None
    return {"name": name, "wall": wall, "tokens": tokens, "steps": [(s["kind"], s["layer"]) for s in path["steps"]],
            "ppl": [s["ppl"] for s in path["steps"]], "heldout": path["heldout"]["pruned_ppl"],
            "evaluated": result.counters.evaluated, "racing": search}


def main() -> None:
    racing = [f"search.racing.windows={ROUND1}", "search.racing.keep=3"]
    exact = campaign("exact", [])
    raced = campaign("raced", racing)
    audited = None if raced["steps"] == exact["steps"] else campaign("audited", [*racing, "search.racing.audit=true"])
    for r in (exact, raced, audited):
        if r is not None:
            print(f"{r['name']}: {r['steps']}, {r['tokens']:,} tokens, {r['wall']:.0f} s, held-out {r['heldout']:.3f}")
    write_results(exact, raced, audited)


def write_results(exact: dict, raced: dict, audited: dict | None) -> None:
    changed = [s for s in audited["racing"]["steps"] if "changed" in s] if audited else []
    lines = ["## Racing vs exact greedy steps (`bench/racing.py`)", "",
             f"SmolLM2-135M, configs/demo.yaml with {SEQUENCES} x 128 calibration tokens (batch 2), "
             f"search.max_steps=3, 2 evaluator actors x 1 CPU, fp32, cold run directories, "
             f"{time.strftime('%Y-%m-%d')}, this machine. Racing: every candidate on the first {ROUND1} windows, the "
             f"best 3 and any within the margin (at least 0.01 in log-perplexity, else 3 x the spread of round 1's "
             f"errors) on all {SEQUENCES}, and {raced['racing'].get('probes', 0)} probe(s): each cut's best cut "
             f"candidate on all {SEQUENCES} too. Tokens: what the evaluators forwarded on calibration windows, from each "
             "run's cache. Held-out: 16 x 256 tokens.", "",
             "| campaign | path | calibration ppl per step | held-out ppl | tokens forwarded | round 2 entrants / "
             "candidates | wall |", "|---|---|---|---:|---:|---:|---:|"]
    for r in (exact, raced, audited):
        if r is None:
            continue
        race = r["racing"]
        entrants = f"{race['finalists']} / {race['candidates']}" if race else "all"
        lines.append(f"| {r['name']} | {', '.join(f'{k}{l}' for k, l in r['steps'])} | "
                     f"{', '.join(f'{p:.3f}' for p in r['ppl'])} | {r['heldout']:.3f} | {r['tokens']:,} | {entrants} | "
                     f"{r['wall']:.0f} s |")
    same = raced["steps"] == exact["steps"]
    if audited is None:
        audit = "no audit was needed."
    else:
        audit = f"the audit found {len(changed)} changed decision(s)" + ("." if not changed else ": " + "; ".join(
            f"{c['label']}: racing {c['changed']['racing_ppl']:.3f} vs exact {c['changed']['exact_ppl']:.3f}"
            for c in changed) + ".")
    lines += ["", f"Racing took {'the same path as' if same else 'another path than'} the exact steps and forwarded "
              f"{exact['tokens'] / raced['tokens']:.2f}x fewer tokens ({raced['tokens']:,} vs {exact['tokens']:,}); "
              + audit]
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
