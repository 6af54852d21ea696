"""Running the plan's steps as ``rayprune`` subprocesses, resumably.

Each step is ``python -m orchestrator.cli ...`` in its own process (its own Ray session, GPU memory
freed at its end), its output streamed to the console and to ``OUT/<row>/<step>.log``. What a step
gave (the JSON ``eval``/``inspect`` print, a campaign's ``path.json`` figures) and its wall time go
into ``OUT/results.json`` as soon as it ends, written atomically; a rerun skips every step recorded
there with the same key (``plan.Step.key``) whose output is still on disk, and a campaign that is
rerun resumes from its own cache. A failed step is recorded as failed, and the rest of its row is
skipped; the other rows still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from .plan import Step

ROOT = Path(__file__).resolve().parents[2]
STATE = "results.json"
#: How the commands are shown: ``rayprune`` stands for this interpreter running the CLI module.
CLI = (sys.executable, "-m", "orchestrator.cli")


def shown(step: Step) -> str:
    import shlex

    return shlex.join(["rayprune", *step.command])


def read_state(out: Path) -> dict[str, Any]:
    path = out / STATE
    if not path.is_file():
        return {"steps": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); move it away to start the reproduction afresh") from None
    state.setdefault("steps", {})
    return state


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``path`` replaced atomically (a temporary sibling, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def is_done(step: Step, state: dict[str, Any]) -> bool:
    """Recorded as finished with the same key, and its output (if any) still on disk."""
    entry = state["steps"].get(step.id) or {}
    return (entry.get("status") == "done" and entry.get("key") == step.key
            and (step.output is None or step.output.is_file()))


def last_json(lines: list[str]) -> dict[str, Any] | None:
    """The last line that is a JSON object (a worker may print other lines before it)."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def campaign_figures(run_dir: Path) -> dict[str, Any]:
    """What the table needs from a finished campaign's ``path.json``."""
    path = json.loads((run_dir / "path.json").read_text(encoding="utf-8"))
    steps = path.get("steps") or []
    last = steps[-1] if steps else {}
    evaluations = path.get("evaluations") or {}
    return {"ratio": last.get("ratio", 0.0), "steps": len(steps), "search_seconds": path.get("seconds"),
            "evaluated": evaluations.get("evaluated"), "heldout": path.get("heldout"),
            "speedup": (path.get("sprint") or {}).get("speedup"), "dtype": path.get("dtype")}


def run_command(step: Step, log: Path, echo: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run the step, streaming its merged output to ``echo`` and ``log``; (return code, last lines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a campaign's log lines reach the console as they are written
    log.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=400)
    with open(log, "w", encoding="utf-8") as sink, subprocess.Popen(
            [*CLI, *step.command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            bufsize=1) as proc:
        sink.write(f"$ {shown(step)}\n")
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            sink.flush()
            tail.append(line.rstrip("\n"))
            echo(f"  | {line.rstrip()}")
        code = proc.wait()
    return code, list(tail)


def execute(step: Step, state: dict[str, Any], out: Path, echo: Callable[[str], None] = print, *,
            force: bool = False) -> bool:
    """Run one step (unless done and not ``force``), record it in ``state`` and ``OUT/results.json``;
    True if it succeeded."""
    if not force and is_done(step, state):
        echo(f"[{step.id}] done in an earlier run ({state['steps'][step.id]['seconds']:.0f} s); skipped")
        return True
    step.write_config()
    log = out / step.row / f"{step.name}.log"
    echo(f"[{step.id}] {shown(step)}")
    t0 = time.perf_counter()
    code, tail = run_command(step, log, echo)
    seconds = time.perf_counter() - t0
    entry: dict[str, Any] = {"key": step.key, "seconds": seconds, "command": shown(step), "log": str(log),
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    result: dict[str, Any] | None = None
    problem = f"exit code {code}" if code else None
    if not problem and step.parse_json:
        result = last_json(tail)
        problem = None if result is not None else "no JSON result in its output"
    if not problem and step.output is not None and not step.output.is_file():
        problem = f"it ended without writing {step.output}"
    if not problem and step.name == "run" and step.output is not None:
        result = campaign_figures(step.output.parent)
    entry.update(status="failed" if problem else "done", result=result, problem=problem)
    state["steps"][step.id] = entry
    write_json(out / STATE, state)
    echo(f"[{step.id}] {'FAILED: ' + problem + f' (log: {log})' if problem else 'done'} in {seconds:.0f} s")
    return problem is None


def execute_plan(steps: list[Step], state: dict[str, Any], out: Path, echo: Callable[[str], None] = print,
                 after_step: Callable[[], None] | None = None) -> list[str]:
    """Every step in order; a row stops at its first failure, and once a step of a row runs again,
    the row's later steps run again too (they read its output). Returns the failed step ids."""
    failed: list[str] = []
    broken: set[str] = set()
    renewed: set[str] = set()
    for step in steps:
        if step.row in broken:
            echo(f"[{step.id}] skipped: an earlier step of row {step.row} failed")
            continue
        force = step.row in renewed
        if force or not is_done(step, state):
            renewed.add(step.row)
        if not execute(step, state, out, echo, force=force):
            failed.append(step.id)
            broken.add(step.row)
        if after_step is not None:
            after_step()
    return failed
