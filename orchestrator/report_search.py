"""The report's section on a whole-mask search (Optuna, evolution), from ``search.json``; writes ``pareto.png``.

``search.json`` is written by the campaign from the searcher's ``summary()``: the ratio band,
trial counts by origin, BlockPruner's mask (the first trial), the best trial and every trial's
(ratio, perplexity). Run directories of greedy methods have no ``search.json`` and no section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_ORIGINS = {"sampler": "proposed by the sampler and evaluated", "repeat": "repeats of a scored mask (told from memory)",
            "cache": "seeded from the cache (add_trial)", "blockpruner": "BlockPruner's mask (enqueued first)",
            "failed": "failed (NaN/inf perplexity)"}


def _cell(value: Any, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def search_section(run_dir: Path, path: dict[str, Any]) -> list[str]:
    """Markdown lines of the section (empty without ``search.json``); ``pareto.png`` is written."""
    from .plots import write_pareto

    file = Path(run_dir) / "search.json"
    if not file.is_file():
        return []
    search = json.loads(file.read_text())
    if search.get("method") == "evolution":
        return evolution_section(search, path)
    if search.get("method") != "optuna":
        return []
    low, high = search["band"]
    lines = ["## Optuna study", "",
             f"Sampler {search['sampler']} (seed {search['seed']}), study `{search['study_name']}` in "
             f"`{search.get('storage') or '(memory)'}` (open it with `optuna-dashboard "
             f"{search.get('storage') or 'optuna.journal'}`). Every proposed mask lies in the ratio band "
             f"[{low:.4f}, {high:.4f}]{' with per-layer widths' if search.get('widths') else ' (whole blocks)'}.", "",
             "| trials | count |", "|---|---:|"]
    lines += [f"| {_ORIGINS.get(k, k)} | {v:,} |" for k, v in sorted(search["counts"].items())]
    lines.append("")
    held = path.get("heldout") or {}
    greedy, best = search.get("blockpruner"), search.get("best")
    rows = [("BlockPruner (warm start)", greedy, held.get("blockpruner_ppl")),
            ("Optuna best", best, held.get("pruned_ppl"))]
    lines += ["| mask | trial | ratio | ppl (calibration) | ppl (held-out) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {_cell(e['trial'], 'd')} | {e['ratio']:.4f} | {_cell(e['ppl'])} | {_cell(h)} |"
              for name, e, h in rows if e]
    lines.append("")
    if search.get("improved") is True:
        gain = 1 - best["ppl"] / greedy["ppl"]
        lines.append(f"Optuna improved on BlockPruner: calibration perplexity {greedy['ppl']:.3f} -> "
                     f"{best['ppl']:.3f} ({gain:.1%} lower) at ratio {best['ratio']:.4f} vs {greedy['ratio']:.4f}.")
    elif search.get("improved") is False:
        lines.append("Optuna did not improve on BlockPruner: its mask (the first trial) stays the best; the "
                     "pruned model is BlockPruner's.")
    else:
        lines.append("No warm start: there is no greedy mask to compare with in this run.")
    lines.append("")
    if any(p["ppl"] is not None for p in search["points"]):
        write_pareto(search, Path(run_dir) / "pareto.png")
        lines += ["![calibration perplexity vs ratio of every trial, the front highlighted](pareto.png)", ""]
    return lines


def evolution_section(search: dict[str, Any], path: dict[str, Any]) -> list[str]:
    """Markdown lines of an evolutionary search: greedy start vs the best mask, how it got there."""
    held = path.get("heldout") or {}
    improvements = [h for h in search["history"] if h["improved"]]
    if search.get("widths"):
        moves = (f"at most {search['max_swaps']} moves of one width level between two layers of one kind each, "
                 f"seed {search['seed']}): {search['evaluations']:,} offspring scored, every one at the greedy "
                 "mask's parameter count to within the norms of the blocks emptied or refilled")
    else:
        moves = (f"at most {search['max_swaps']} swaps of a removed and a kept block of one kind each, seed "
                 f"{search['seed']}): {search['evaluations']:,} offspring scored, every one at the greedy mask's "
                 "parameter count")
    lines = ["## Evolutionary search", "",
             f"Warm-started from BlockPruner's mask, {search['generations']} generations of {search['offspring']} "
             f"offspring ({moves}.", "",
             "| mask | ppl (calibration) | ppl (held-out) |", "|---|---:|---:|",
             f"| BlockPruner (warm start) | {_cell(search['greedy_ppl'])} | "
             f"{_cell(held.get('greedy_ppl', held.get('pruned_ppl') if not improvements else None))} |",
             f"| evolution best | {_cell(search['best_ppl'])} | {_cell(held.get('pruned_ppl'))} |", ""]
    if improvements:
        lines.append(f"The parent improved in {len(improvements)} generation(s), the last in generation "
                     f"{improvements[-1]['generation']}: calibration perplexity {search['greedy_ppl']:.3f} -> "
                     f"{search['best_ppl']:.3f} ({1 - search['best_ppl'] / search['greedy_ppl']:.1%} lower).")
    else:
        lines.append("No offspring beat the greedy mask: the pruned model is BlockPruner's.")
    return [*lines, ""]
