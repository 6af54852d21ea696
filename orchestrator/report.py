"""``report.md`` and ``curve.png`` of a run directory, from ``path.json`` alone."""

from __future__ import annotations

import json
from pathlib import Path


def step_label(step: dict) -> str:
    """``attn 20``, ``mlp 3``, ``mlp 5 -> 1280 ch``, ``heads 7 -> 2 units``."""
    if step["kind"] == "mlp_width":
        return f"mlp {step['layer']} -> {step['width']} ch"
    if step["kind"] == "attn_width":
        return f"heads {step['layer']} -> {step['width']} units"
    return f"{step['kind']} {step['layer']}"


def path_table(path: dict) -> str:
    lines = ["| step | removed / narrowed | ppl (calibration) | ratio | parameters |", "|---:|---|---:|---:|---:|",
             f"| 0 | (dense) | {path['dense_ppl']:.3f} | 0.0000 | {path['dense_params']:,} |"]
    for s in path["steps"]:
        lines.append(f"| {s['step']} | {step_label(s)} | {s['ppl']:.3f} | {s['ratio']:.4f} | {s.get('params', 0):,} |")
    return "\n".join(lines)


def write_curve(path: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [0.0] + [s["ratio"] for s in path["steps"]]
    ppls = [path["dense_ppl"]] + [s["ppl"] for s in path["steps"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ratios, ppls, marker="o", lw=1.5)
    for s in path["steps"]:
        ax.annotate(f"{s['kind']}{s['layer']}", (s["ratio"], s["ppl"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("removed parameter ratio")
    ax.set_ylabel("calibration perplexity")
    ax.set_title("removal path")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and ``curve.png`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    path = json.loads((run_dir / "path.json").read_text())
    held = path.get("heldout") or {}
    ev = path.get("evaluations") or {}
    final = path["steps"][-1] if path["steps"] else None
    lines = [f"# rayprune report: {run_dir.name}", ""]
    if final:
        lines += [f"Removed {len(path['steps'])} blocks: {final['ratio']:.2%} of {path['dense_params']:,} parameters "
                  f"(target {path.get('target_ratio', float('nan')):.2%}).", ""]
    if held:
        lines += ["| model | held-out perplexity |", "|---|---:|",
                  f"| dense | {held['dense_ppl']:.3f} |", f"| pruned | {held['pruned_ppl']:.3f} |", ""]
    lines += ["## Removal path", "", path_table(path), ""]
    if ev:
        lines += [f"Evaluations: {ev.get('evaluated', 0)} run, {ev.get('cached', 0)} served from the cache, "
                  f"{ev.get('failed', 0)} failed; wall time {path.get('seconds', 0):.0f} s.", ""]
    if path["steps"]:
        write_curve(path, run_dir / "curve.png")
        lines += ["![perplexity vs ratio](curve.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
