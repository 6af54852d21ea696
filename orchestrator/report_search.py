"""The report's sections on a search (Optuna, evolution, racing), from ``search.json``; writes ``pareto.png``.

``search.json`` is written by the campaign from the searcher's ``summary()``: for Optuna the ratio
band, trial counts by origin, BlockPruner's mask (the first trial), the best trial and every trial's
(ratio, perplexity); for evolution its generations; for racing (``"racing"``) its rounds, counts and
audit. Run directories of exact greedy methods have no ``search.json`` and no section.
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
    if "racing" in search:
        return racing_section(search["racing"])
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


def racing_section(racing: dict[str, Any]) -> list[str]:
    """Markdown lines of a raced greedy search: its rounds, how many candidates each step kept, the
    steps a probe won and, with the audit, every decision racing changed."""
    steps, probes = racing["steps"], racing.get("probes", 0)
    plural = "s" if probes > 1 else ""
    windows = racing["windows"]
    rounds = (f"a round on {windows[0]}" if len(windows) == 1
              else "rounds on " + ", ".join(map(str, windows[:-1])) + f" and {windows[-1]}")
    lines = ["## Racing", "",
             f"Each step raced its candidates in {rounds} calibration windows, then on all of them: "
             f"every candidate in the first round; in each later one, the best {racing['keep']} of the round before "
             f"and any within that round's margin (at least {racing['min_margin']} log-perplexity)"
             + (f", plus {probes} probe{plural} per cut (the best candidate{plural} it cut, sent on to all "
                "windows)." if probes else "; no probes."), "",
             "| | |", "|---|---:|",
             f"| steps | {len(steps):,} |",
             f"| candidates | {racing['candidates']:,} |",
             f"| scored on all windows | {racing['finalists']:,} |"]
    if probes:
        lines += [f"| of them probes | {sum(s.get('probes', 0) for s in steps):,} |",
                  f"| steps won by a probe (the cut alone would have lost them) | {racing.get('probe_won', 0):,} |"]
    lines.append("")
    if steps:
        margins = ", ".join(f"{m:.3f} on {w} windows" for m, w in zip(steps[-1]["margins"], racing["windows"]))
        lines += [f"Margins at the last step: {margins}.", ""]
    if racing.get("audit"):
        changed = [(i + 1, s["changed"]) for i, s in enumerate(steps) if "changed" in s]
        lines.append(f"Audit: every candidate was also scored on all windows; racing changed "
                     f"{len(changed)} decision{'' if len(changed) == 1 else 's'}"
                     + ("." if not changed else ":"))
        lines += [f"- step {i}: racing took {mask_difference(c['racing'], c['exact'])} (calibration "
                  f"{_cell(c['racing_ppl'])}), the exact step {mask_difference(c['exact'], c['racing'])} "
                  f"({_cell(c['exact_ppl'])})" for i, c in changed]
        lines.append("")
    return lines


def mask_difference(mask: dict[str, Any], other: dict[str, Any]) -> str:
    """What ``mask`` removes or narrows that ``other`` does not, e.g. ``MLP 14`` or ``attention 3 to 2 units``."""
    parts = [f"attention {l}" for l in sorted(set(mask["attn_removed"]) - set(other["attn_removed"]))]
    parts += [f"MLP {l}" for l in sorted(set(mask["mlp_removed"]) - set(other["mlp_removed"]))]
    for key, name, unit in (("head_units", "attention", "units"), ("mlp_width", "MLP", "channels")):
        mine, theirs = mask.get(key) or {}, other.get(key) or {}
        parts += [f"{name} {l} to {mine[l]} {unit}" for l in sorted(mine, key=int) if theirs.get(l) != mine[l]]
    return ", ".join(parts) or "the same blocks"
