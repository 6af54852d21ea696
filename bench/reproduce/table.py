"""The reproduction's table: rayprune's figures next to the published ones, per row.

Every cell reads ``ours / published``. ``n/a``: the sources give no published figure; ``—``: not
measured (the row was not run, or zero-shot tasks were off); ``failed``: its step failed (the log is
named in ``results.json``). Held-out windows other than the papers' (``--eval-length``, local data)
are flagged, since such a perplexity does not compare with the published one.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .plan import ROWS, TABLE_ORDER, Options
from .published import PUBLISHED, Published

MISSING, UNKNOWN, FAILED = "—", "n/a", "failed"
HEADER = ("row", "how", "protocol", "ratio", "parameters", "WikiText-2 ppl (2048)", "zero-shot avg",
          "pruning time", "eval time")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pair(ours: str, published: str) -> str:
    return f"{ours} / {published}"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return MISSING
    return {"ratio": lambda v: f"{100 * v:.2f}%", "params": lambda v: f"{int(v):,}", "ppl": lambda v: f"{v:.2f}",
            "avg": lambda v: f"{v:.2f}"}[kind](value)


def _published(value: Any, kind: str) -> str:
    return UNKNOWN if value is None else _fmt(value, kind)


def _step(state: dict[str, Any], row: str, name: str) -> dict[str, Any]:
    return (state.get("steps") or {}).get(f"{row}/{name}") or {}


def _result(entry: dict[str, Any]) -> dict[str, Any]:
    return (entry.get("result") or {}) if entry.get("status") == "done" else {}


def figures(state: dict[str, Any], row: str, task_set: str | None) -> dict[str, Any]:
    """rayprune's figures of ``row`` from the recorded steps (None where not measured)."""
    run, export, inspect, ev = (_step(state, row, n) for n in ("run", "export", "inspect", "eval"))
    evaluation = _result(ev)
    held = evaluation.get("heldout") or {}
    average = ((evaluation.get("tasks") or {}).get(f"{task_set} average") or {}).get("acc")
    ratio = {"dense": 0.0 if evaluation else None,
             "multipruner-published": _result(inspect).get("ratio")}.get(row, _result(run).get("ratio"))
    search = run or export
    return {
        "ratio": ratio, "params": evaluation.get("params"), "ppl": held.get("ppl"),
        "average": None if average is None else 100 * average,
        "heldout": {k: held.get(k) for k in ("protocol", "corpus", "length", "windows")} if held else None,
        "speedup": _result(run).get("speedup"), "steps": _result(run).get("steps"),
        "pruning_seconds": search.get("seconds") if search.get("status") == "done" else None,
        "eval_seconds": ev.get("seconds") if ev.get("status") == "done" else None,
        "failed": [n for n, e in (("run", run), ("export", export), ("inspect", inspect), ("eval", ev))
                   if e.get("status") == "failed"],
    }


def lines(options: Options) -> list[tuple[str, str]]:
    """(row, published key) of every table line for the rows in ``options.only``."""
    shown = []
    for name in TABLE_ORDER:
        if name not in options.only:
            continue
        shown.append((name, name))
        if name == "dense" and options.tasks:
            shown.append((name, "dense (sprint tasks)"))
    return shown


def table_rows(state: dict[str, Any], options: Options) -> list[dict[str, Any]]:
    """One dict per table line: row, task set, rayprune's figures, the published ones."""
    rows = []
    for name, key in lines(options):
        published: Published = PUBLISHED[key]
        task_set = published.task_set if options.tasks else None
        rows.append({"row": key, "how": ROWS[name].method, "protocol": ROWS[name].protocol, "task_set": task_set,
                     "ours": figures(state, name, task_set), "published": asdict(published)})
    return rows


def _flag(held: dict[str, Any] | None, options: Options) -> str:
    """A mark for held-out windows that are not the papers' (other length or local text)."""
    if not held:
        return ""
    return " *" if held.get("length") != 2048 or options.wikitext_test else ""


def markdown(rows: list[dict[str, Any]], options: Options) -> str:
    """The table, then its legend and the notes on the published figures."""
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---:|" * 6]
    for line in rows:
        ours, pub = line["ours"], line["published"]
        fail = bool(ours["failed"])
        avg_ours = FAILED if fail and ours["average"] is None and options.tasks else _fmt(ours["average"], "avg")
        avg = _pair(avg_ours, _published(pub["average"], "avg")) + (f" ({line['task_set']})" if line["task_set"] else "")
        ppl = _pair(FAILED if fail and ours["ppl"] is None else _fmt(ours["ppl"], "ppl"), _published(pub["ppl"], "ppl"))
        hours = pub["hours"]
        cells = [line["row"], line["how"] + (f" (est. speedup {ours['speedup']:.2f}x)" if ours["speedup"] else ""),
                 line["protocol"], _pair(_fmt(ours["ratio"], "ratio"), _published(pub["ratio"], "ratio")),
                 _pair(_fmt(ours["params"], "params"), _published(pub["params"], "params")),
                 ppl + _flag(ours["heldout"], options), avg,
                 _pair(duration(ours["pruning_seconds"]), UNKNOWN if hours is None else f"{hours:g} h"),
                 duration(ours["eval_seconds"])]
        out.append("| " + " | ".join(cells) + " |")
    notes = [f"Cells: rayprune / published. {UNKNOWN}: no published figure in the sources; {MISSING}: not "
             f"measured{' (zero-shot tasks off: --no-tasks)' if not options.tasks else ''}; {FAILED}: see the "
             f"step's log (results.json names it)."]
    if any(_flag(line["ours"]["heldout"], options) for line in rows):
        notes.append("*: held-out windows other than the papers' (local text or another length): not comparable.")
    for line in rows:
        pub = line["published"]
        if line["ours"]["failed"]:
            notes.append(f"{line['row']}: step(s) {', '.join(line['ours']['failed'])} failed.")
        notes.append(f"{line['row']}: published figures: {pub['source']}" + (f"; {pub['note']}" if pub["note"] else "")
                     + ".")
    return "\n".join(out) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
