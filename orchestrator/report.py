"""``report.md``, ``curve.png`` and ``mask.png`` of a run directory, from ``path.json``.

The dense widths the mask picture needs come from ``path.json``'s ``arch`` entry; run directories
written before it existed fall back to the model named in ``config.yaml`` (its ``config.json``
alone, no weights). Without either, the report is written without the mask picture.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search_spaces import Arch, Mask

from .data.protocols import describe_protocol
from .formatting import duration
from .rundir import RunDir, final_mask

log = logging.getLogger("rayprune")


def step_label(step: dict) -> str:
    """``attn 20``, ``mlp 3``, ``mlp 5 -> 1280 ch``, ``heads 7 -> 2 units``."""
    if step["kind"] == "mlp_width":
        return f"mlp {step['layer']} -> {step['width']} ch"
    if step["kind"] == "attn_width":
        return f"heads {step['layer']} -> {step['width']} units"
    if step["kind"] == "trial":
        return f"Optuna trial {step['layer']} (whole mask)"
    return f"{step['kind']} {step['layer']}"


def calibration_column(path: dict) -> str:
    """What the calibration scores of a run are: perplexity, or exp(mean KL to the dense model)."""
    fitness = path.get("fitness", "ppl")
    return "ppl (calibration)" if fitness == "ppl" else f"exp(KL) to dense (calibration, {fitness})"


def path_table(path: dict) -> str:
    lines = [f"| step | removed / narrowed | {calibration_column(path)} | ratio | parameters |", "|---:|---|---:|---:|---:|",
             f"| 0 | (dense) | {path['dense_ppl']:.3f} | 0.0000 | {path['dense_params']:,} |"]
    for s in path["steps"]:
        lines.append(f"| {s['step']} | {step_label(s)} | {s['ppl']:.3f} | {s['ratio']:.4f} | {s.get('params', 0):,} |")
    return "\n".join(lines)


def run_arch(run_dir: Path, path: dict) -> Arch | None:
    """The dense architecture of a run: ``path.json``'s ``arch``, else config.yaml's model."""
    from search_spaces import Arch

    if isinstance(path.get("arch"), dict):
        return Arch(**path["arch"])
    model = RunDir(run_dir).read_config().get("model")
    if not model:
        return None
    try:
        from actors.models import read_model_config

        return Arch.from_hf_config(read_model_config(str(model)))
    except (ValueError, OSError) as exc:
        log.warning("no mask picture: the architecture of %s cannot be read (%s)", model, exc)
        return None


def _structure_lines(mask: Mask) -> list[str]:
    def layers(values) -> str:
        return ", ".join(str(v) for v in sorted(values)) or "none"

    lines = [f"- attention removed in layers: {layers(mask.attn_removed)}",
             f"- MLP removed in layers: {layers(mask.mlp_removed)}"]
    if mask.head_units:
        lines.append("- heads narrowed: " + ", ".join(f"layer {l} -> {w} units" for l, w in mask.head_units))
    if mask.mlp_width:
        lines.append("- MLP narrowed: " + ", ".join(f"layer {l} -> {w} ch" for l, w in mask.mlp_width))
    return lines


def _summary(path: dict, config: dict[str, Any], mask: Mask) -> list[str]:
    steps = path["steps"]
    final = steps[-1] if steps else None
    search = config.get("search") or {}
    what = [f"Model `{config['model']}`"] if config.get("model") else []
    if search.get("method"):
        what.append(f"method {search['method']}")
    target = path.get("target_ratio", search.get("target_ratio"))
    if target is not None:
        what.append(f"target ratio {target:.2%}")
    lines = [", ".join(what) + "." if what else ""]
    if final:
        removed = len(mask.attn_removed) + len(mask.mlp_removed)
        narrowed = len(mask.head_units) + len(mask.mlp_width)
        parts = [f"{removed} blocks removed"] + ([f"{narrowed} narrowed"] if narrowed else [])
        lines.append(f"{len(steps)} steps ({', '.join(parts)}): {final['ratio']:.2%} of "
                     f"{path['dense_params']:,} parameters removed, {final.get('params', 0):,} kept.")
    return [line for line in lines if line] + [""]


def _quality_table(path: dict) -> list[str]:
    held = path.get("heldout") or {}
    final = path["steps"][-1] if path["steps"] else None
    lines = [f"| model | parameters | ratio | {calibration_column(path)} | ppl (held-out) |", "|---|---:|---:|---:|---:|"]

    def cell(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(f"| dense | {path['dense_params']:,} | 0.0000 | {path['dense_ppl']:.3f} | {cell(held.get('dense_ppl'))} |")
    if final:
        lines.append(f"| pruned | {final.get('params', 0):,} | {final['ratio']:.4f} | {final['ppl']:.3f} | "
                     f"{cell(held.get('pruned_ppl'))} |")
    return lines + [""]


def _cost_lines(path: dict) -> list[str]:
    ev = path.get("evaluations") or {}
    seconds = path.get("seconds")
    if not ev and seconds is None:
        return []
    lines = ["| | |", "|---|---:|"]
    if seconds is not None:
        lines.append(f"| wall time | {duration(seconds)} ({seconds:.0f} s) |")
        if path["steps"]:
            lines.append(f"| per step | {seconds / len(path['steps']):.1f} s |")
    if ev:
        lines += [f"| evaluations run | {ev.get('evaluated', 0):,} |",
                  f"| served from the cache | {ev.get('cached', 0):,} |",
                  f"| failed | {ev.get('failed', 0):,} |"]
    return lines + ["", "Evaluation counts are those of the last session on this run directory (a resumed "
                        "run serves earlier results from the cache).", ""]


def _refresh_pruning_config(rundir: RunDir, path: dict, mask: Mask) -> list[str]:
    """Rewrite a stale ``pruning_config.json`` from ``path.json``; returns what is still stale (model/)."""
    stale = rundir.stale_artefacts(path)
    if any(p.startswith("pruning_config.json") for p in stale) and isinstance(path.get("arch"), dict):
        from search_spaces import Arch
        from search_spaces.pruning_config import mask_to_pruning_config

        rundir.write_json("pruning_config.json", mask_to_pruning_config(mask, Arch(**path["arch"])))
        log.info("%s: pruning_config.json rewritten from path.json (it held an earlier mask)", rundir.path)
        stale = [p for p in stale if not p.startswith("pruning_config.json")]
    return stale


def write_report(run_dir: Path) -> Path:
    """Write ``report.md``, ``curve.png`` and ``mask.png`` into ``run_dir``; returns the report's path."""
    from .plots import write_curve, write_mask

    run_dir = Path(run_dir)
    rundir = RunDir(run_dir)
    path, config = rundir.read_path(), rundir.read_config()
    mask = final_mask(path)
    stale = _refresh_pruning_config(rundir, path, mask)
    lines = [f"# rayprune report: {run_dir.name}", ""] + _summary(path, config, mask)
    lines += [describe_protocol(config["data"]), ""] if isinstance(config.get("data"), dict) else []
    lines += ["## Dense vs pruned", ""] + _quality_table(path)
    lines += ["## Removal path", "", path_table(path), ""]
    if path["steps"]:
        write_curve(path, run_dir / "curve.png")
        lines += ["![calibration perplexity vs removed ratio](curve.png)", ""]
    lines += ["## Kept structure", ""] + _structure_lines(mask) + [""]
    arch = run_arch(run_dir, path)
    if arch is not None:
        final = path["steps"][-1]["ratio"] if path["steps"] else 0.0
        write_mask(mask, arch, run_dir / "mask.png",
                   title=f"kept structure at ratio {final:.2%} (\u00d7 removed; numbers: width kept)")
        lines += ["![kept structure per layer](mask.png)", ""]
    from .report_search import search_section

    lines += search_section(run_dir, path)
    if stale:
        lines += ["## Stale files", "", *(f"- {problem}" for problem in stale), ""]
        for problem in stale:
            log.warning("%s: %s", run_dir, problem)
    cost = _cost_lines(path)
    if cost:
        lines += ["## Time and evaluations", ""] + cost
    from .report_recovery import recovery_section

    lines += recovery_section(run_dir)
    return rundir.write_text("report.md", "\n".join(lines).rstrip() + "\n")
