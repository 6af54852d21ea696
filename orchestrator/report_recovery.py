"""The report's section on the recovery fine-tuning, from ``recovery/result.json``; writes ``recovery/loss.png``.

``result.json`` is written by the recovery driver when a recovery finishes: the models (compact,
merged, adapter), the data trained on, the LoRA and optimiser settings, held-out perplexity of the
dense, pruned and recovered models on the run's evaluation windows, the training totals and, with
``--tasks``, zero-shot metrics of the pruned and recovered models (``actors.zeroshot.zero_shot``'s
``{task: {metric: value, "samples": n}}``). ``recovery/log.jsonl`` holds one JSON entry per logging
interval (``{"step", "loss", "lr", "tokens", "seconds"}``, sometimes ``"val_loss"``); it becomes the
loss picture. A run directory without ``result.json`` has no section. Missing figures read ``n/a``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rayprune")

TITLE = "## Recovery (LoRA fine-tuning)"
#: The models whose zero-shot metrics the table shows, in this order, when the result has them.
_ZERO_SHOT_MODELS = ("dense", "pruned", "recovered")


def recovery_section(run_dir: Path) -> list[str]:
    """Markdown lines of the section (empty without ``recovery/result.json``); ``recovery/loss.png``
    is written from ``recovery/log.jsonl`` when that has entries."""
    folder = Path(run_dir) / "recovery"
    file = folder / "result.json"
    if not file.is_file():
        return []
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s cannot be read (%s): the report has no recovery section", file, exc)
        return []
    lines = [TITLE, "", _models_line(result), ""]
    lines += _perplexity_table(result.get("heldout") or {})
    lines += _facts(result)
    lines += _zero_shot_table(result.get("tasks"))
    entries = read_log(folder / "log.jsonl")
    if entries:
        from .plots import write_loss_curve

        write_loss_curve(entries, folder / "loss.png", title=_plot_title(result))
        lines += ["![recovery training loss](recovery/loss.png)", ""]
    return lines


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON entries of a ``log.jsonl``; unreadable lines (a torn last line) are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _cell(value: Any, fmt: str = ".3f") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _models_line(result: dict[str, Any]) -> str:
    line = f"The compact model `{result.get('model', '?')}` fine-tuned with LoRA"
    if result.get("merged"):
        line += f", merged into `{result['merged']}`"
    if result.get("adapter"):
        line += f" (the adapter alone: `{result['adapter']}`)"
    return line + "."


def _perplexity_table(held: dict[str, Any]) -> list[str]:
    dense, pruned, recovered = held.get("dense"), held.get("pruned"), held.get("recovered")
    change = _cell(100 * (recovered / pruned - 1), "+.2f") + " %" if _positive(pruned, recovered) else ""
    lines = ["| model | ppl (held-out) | change vs pruned |", "|---|---:|---:|",
             f"| dense | {_cell(dense)} | |", f"| pruned | {_cell(pruned)} | |",
             f"| recovered | {_cell(recovered)} |{' ' + change if change else ''} |", ""]
    where = ""
    if held.get("windows") and held.get("length"):
        where = f"{held['windows']} windows of {held['length']} tokens"
        where += f" from {held['corpus']}" if held.get("corpus") else ""
    if where:
        lines.append(f"Held-out perplexity on the run's evaluation windows ({where}).")
    if _positive(dense, pruned, recovered) and pruned != dense:
        closed = (pruned - recovered) / (pruned - dense)
        lines.append(f"The recovery closed {closed:.1%} of the gap between the pruned and the dense model.")
    return lines + [""] if lines[-1] else lines


def _positive(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)


def _facts(result: dict[str, Any]) -> list[str]:
    """Data, training totals and settings, one bullet each."""
    from .formatting import duration

    data, train, settings = result.get("data") or {}, result.get("train") or {}, result.get("settings") or {}
    lines = []
    if data:
        text = f"- Data: `{data.get('source', '?')}`" + (f" ({data['format']})" if data.get("format") else "")
        text += f", {_count(data.get('train_examples'))} training examples"
        if data.get("train_tokens") is not None:
            text += f" ({_count(data['train_tokens'])} tokens"
            supervised = data.get("train_supervised_tokens")
            text += f", {_count(supervised)} of them in the loss)" if supervised is not None else ")"
        if data.get("val_examples") is not None:
            text += f", {_count(data['val_examples'])} for validation"
        if data.get("dropped_overlap") is not None:
            text += f"; {_count(data['dropped_overlap'])} dropped for overlapping the held-out windows"
        lines.append(text + ".")
    if train:
        steps, total = train.get("steps"), train.get("total_steps")
        planned = f" of {_count(total)}" if total is not None and total != steps else ""
        text = f"- Training: {_count(steps)}{planned} optimizer steps on {_count(train.get('tokens_trained'))} tokens"
        if isinstance(train.get("seconds"), (int, float)):
            text += f" in {duration(train['seconds'])} ({train['seconds']:.0f} s wall time)"
        if train.get("resumed_from_step"):
            text += f", resumed from step {train['resumed_from_step']}"
        if train.get("final_loss") is not None:
            text += f"; final training loss {_cell(train['final_loss'])}"
        if train.get("final_val_loss") is not None:
            text += f", validation loss {_cell(train['final_val_loss'])}"
        lines.append(text + ".")
    if settings:
        lines.append("- Settings: " + _settings_line(settings) + ".")
    return lines + [""] if lines else []


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "n/a" if value is None else str(value)


def _settings_line(s: dict[str, Any]) -> str:
    targets = ", ".join(s["targets"]) if isinstance(s.get("targets"), list) else str(s.get("targets", "?"))
    parts = [f"LoRA r {s.get('r', '?')}, alpha {_number(s.get('alpha'))}, dropout {_number(s.get('dropout'))} on {targets}",
             f"lr {_number(s.get('lr'))}"]
    if s.get("batch_size") is not None:
        accum = s.get("grad_accum") or 1
        parts.append(f"{s['batch_size']} sequences per micro-batch x {accum} accumulation = "
                     f"{s['batch_size'] * accum} per optimizer step")
    parts.append(f"{s['max_steps']} steps" if s.get("max_steps") else f"{s.get('epochs', '?')} epochs")
    if s.get("warmup_steps") is not None:
        parts.append(f"{s['warmup_steps']} warm-up steps")
    if s.get("max_length") is not None:
        parts.append(f"sequences of {s['max_length']} tokens")
    if s.get("workers") is not None:
        parts.append(f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}")
    if s.get("dtype"):
        parts.append(str(s["dtype"]))
    return "; ".join(parts)


def _number(value: Any) -> str:
    return format(value, "g") if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _zero_shot_table(tasks: Any) -> list[str]:
    """Metrics of each model side by side (``format_result``'s: every metric but stderr and samples)."""
    if not isinstance(tasks, dict):
        return []
    models = [m for m in _ZERO_SHOT_MODELS if isinstance(tasks.get(m), dict)]
    if not models:
        return []
    names = list(dict.fromkeys(name for m in models for name in tasks[m]))
    change = "pruned" in models and "recovered" in models
    lines = ["Zero-shot (lm-evaluation-harness, 0-shot):", "",
             "| task | metric | " + " | ".join(models) + (" | change |" if change else " |") + " items |",
             "|---|---|" + "---:|" * len(models) + ("---:|" if change else "") + "---:|"]
    for name in names:
        rows = [tasks[m].get(name) or {} for m in models]
        metrics = list(dict.fromkeys(k for row in rows for k in row if not k.endswith("_stderr") and k != "samples"))
        items = next((int(row["samples"]) for row in rows if isinstance(row.get("samples"), (int, float))), None)
        for metric in metrics:
            values = [row.get(metric) for row in rows]
            cells = [_cell(v, ".4f") for v in values]
            if change:
                before, after = tasks["pruned"].get(name, {}).get(metric), tasks["recovered"].get(name, {}).get(metric)
                both = all(isinstance(v, (int, float)) for v in (before, after))
                cells.append(_cell(after - before, "+.4f") if both else "n/a")
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + f" | {_count(items)} |")
    return lines + [""]


def _plot_title(result: dict[str, Any]) -> str:
    s = result.get("settings") or {}
    return f"recovery: LoRA r {s.get('r', '?')}, lr {_number(s.get('lr'))}, global batch " + (
        f"{s['batch_size'] * (s.get('grad_accum') or 1)}" if isinstance(s.get("batch_size"), int) else "?")
