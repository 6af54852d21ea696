"""Benchmark: what each of the papers' semantics changes, one setting at a time (issue "Faithful to
the papers' code").

    .venv/bin/python bench/paper_semantics.py [SPRINT] [MultiPruner]   # default: both

On SmolLM2-135M with the demo's data (2 x 128 calibration tokens, 16 x 256 held-out), one after the
other on this machine:

- SPRINT (configs/sprint-smollm2.yaml, target 0.118, a 512-token prefill latency table measured once
  and shared by every run): the paper's defaults, then each earlier behaviour alone (``metric: l2``,
  ``reference: current``, ``refit_target: dense``, ``memory: false``, ``no_mlp_score: untuned``,
  ``latency_fixed: true``), then all of them together (rayprune's earlier SPRINT);
- MultiPruner (configs/demo.yaml's data, target 0.1119, the campaigns bench's setting): ``stage_stop:
  within``, then ``kv_weight: once`` (the paper's defaults are bench/campaigns.py's MultiPruner row).

Held-out perplexity is the figure to read; wall times are of one run each on a shared machine.
Section ``<!-- paper_semantics -->`` of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator.campaign import Campaign  # noqa: E402
from orchestrator.config_load import load_config  # noqa: E402
from orchestrator.rundir import RunDir  # noqa: E402
from results import write_section  # noqa: E402

MARKER = "<!-- paper_semantics -->"
OUT = ROOT / "runs" / "bench-paper-semantics"
SPRINT_EARLIER = {"metric": "l2", "reference": "current", "refit_target": "dense", "memory": "false",
                  "no_mlp_score": "untuned", "latency_fixed": "true"}
MULTIPRUNER_EARLIER = {"stage_stop": "within", "kv_weight": "once"}


def campaign(config: str, name: str, overrides: list[str]) -> dict:
    run_dir = OUT / name
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = Campaign(load_config(ROOT / "configs" / config, [f"name=semantics-{name}", f"output={run_dir}",
                                                              "export=false", *overrides]), progress=False).run()
    wall = time.perf_counter() - t0
    path = RunDir(result.run_dir).read_path()
    kinds: dict[str, int] = {}
    for step in path["steps"]:
        kinds[step["kind"]] = kinds.get(step["kind"], 0) + 1
    figures = {"name": name, "wall": wall, "ratio": path["steps"][-1]["ratio"],
               "heldout": path["heldout"]["pruned_ppl"], "steps": ", ".join(f"{n} {k}" for k, n in kinds.items())}
    (run_dir / "result.json").write_text(json.dumps(figures))
    return figures


def rows_of(method: str) -> list[tuple[str, str, list[str]]]:
    """(config, run name, overrides) of each row of ``method``, in the table's order."""
    if method == "SPRINT":
        base = ["search.target_ratio=0.118", "search.sprint.latency_prompt=512", "search.sprint.latency_generate=0"]
        return ([("sprint-smollm2.yaml", "sprint-paper", base)]
                + [("sprint-smollm2.yaml", f"sprint-{k}", [*base, f"search.sprint.{k}={v}"])
                   for k, v in SPRINT_EARLIER.items()]
                + [("sprint-smollm2.yaml", "sprint-earlier",
                    [*base, *(f"search.sprint.{k}={v}" for k, v in SPRINT_EARLIER.items())])])
    base = ["search.method=multipruner", "search.target_ratio=0.1119"]  # its defaults: bench/campaigns.py's row
    return [("demo.yaml", f"multipruner-{k}", [*base, f"search.{k}={v}"]) for k, v in MULTIPRUNER_EARLIER.items()]


def setting(name: str) -> str:
    key = name.split("-", 1)[1]
    earlier = {**SPRINT_EARLIER, **MULTIPRUNER_EARLIER}
    return {"paper": "paper (defaults)", "earlier": "all earlier"}.get(key, f"{key}: {earlier.get(key)}")


def main() -> None:
    only = sys.argv[1:] or ["SPRINT", "MultiPruner"]
    for method in only:
        for config, name, overrides in rows_of(method):
            r = campaign(config, name, overrides)
            print(f"{method} {setting(name)}: ratio {r['ratio']:.4f}, held-out {r['heldout']:.3f}, {r['wall']:.0f} s")
    lines = ["## The papers' semantics, one setting at a time (`bench/paper_semantics.py`)", "",
             f"{time.strftime('%Y-%m-%d')}, this machine (2 cores; wall times indicative, some runs shared it), SmolLM2-135M, the demo's 2 x 128 calibration "
             "tokens and 16 x 256 held-out tokens (dense 19.855). SPRINT: configs/sprint-smollm2.yaml to 0.118, "
             "one 512-token prefill latency table for every run. MultiPruner: 30:60:10, MLP group 256, to 0.1119; "
             "its paper-default row is bench/campaigns.py's. Each row but a method's defaults reverts one setting "
             "(\"all earlier\": every one) to rayprune's earlier behaviour.", "",
             "| method | setting | ratio | steps | held-out ppl | wall |", "|---|---|---:|---|---:|---:|"]
    for method in ("SPRINT", "MultiPruner"):
        for _, name, _ in rows_of(method):
            file = OUT / name / "result.json"
            if file.is_file():
                r = json.loads(file.read_text())
                lines.append(f"| {method} | {setting(name)} | {r['ratio']:.4f} | {r['steps']} | {r['heldout']:.3f} | "
                             f"{r['wall']:.0f} s |")
    write_section(MARKER, lines)


if __name__ == "__main__":
    main()
