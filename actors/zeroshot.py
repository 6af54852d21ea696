"""Zero-shot accuracy through lm-evaluation-harness, on a model already in memory.

An optional extra: ``pip install 'rayprune[eval]'`` (or ``-r requirements-eval.txt``). The model
(dense, or a compact export from :func:`actors.export.load_pruned`) is wrapped in lm_eval's
``HFLM`` as it is, so no dense copy is ever loaded. A task is a registered lm_eval name (its data
comes from the hub) or a local task YAML file; relative ``dataset_kwargs.data_files`` in a local
YAML are resolved against the YAML's folder, so a task and its JSONL can travel together.

A task file runs no code: one that names Python (lm_eval's ``!function`` tag, in it or in a file it
``include``s) is refused before anything loads, and the Jinja templates of every task render in a
sandbox (:func:`sandboxed_templates`), so a task YAML from someone else's run directory can
neither import a module nor reach Python internals through a template.

A named task set (:data:`TASK_SETS`) stands for the papers' zero-shot tasks: ``blockpruner`` and
``multipruner`` are PIQA, WinoGrande, HellaSwag, ARC-e and ARC-c (their eval.py); ``sprint`` has
BoolQ instead of WinoGrande (its eval_utils.py). With a set, the result also holds the set's average
as the papers compute it: each task's ``acc_norm`` where lm_eval reports one, else its ``acc``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import yaml

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["TASK_SETS", "EvalExtraMissing", "check_tasks", "expand_tasks", "paper_average", "refuse_code",
           "sandboxed_templates", "task_spec", "zero_shot"]

INSTALL_HINT = "install the optional extra: pip install 'rayprune[eval]' (or pip install -r requirements-eval.txt)"


#: The papers' zero-shot task sets, by name (lm_eval task names, in the order their code lists them).
_FIVE = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
TASK_SETS: dict[str, tuple[str, ...]] = {
    "blockpruner": _FIVE,  # BlockPruner eval.py --tasks default
    "multipruner": _FIVE,  # MultiPruner eval.py task_names
    "sprint": ("piqa", "hellaswag", "arc_challenge", "arc_easy", "boolq"),  # SPRINT eval_utils.comprehensive_eval
}


def expand_tasks(tasks: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(tasks, sets)``: every named set in ``tasks`` replaced by its tasks (each task once, first
    mention first), and the set names that were used. Anything else is kept as given."""
    expanded: list[str] = []
    sets: list[str] = []
    for task in tasks:
        members = TASK_SETS.get(task)
        if members is not None and task not in sets:
            sets.append(task)
        for name in members or (task,):
            if name not in expanded:
                expanded.append(name)
    return expanded, sets


def paper_average(results: dict[str, dict[str, float]], tasks: Sequence[str]) -> dict[str, float]:
    """The papers' average over ``tasks``: ``acc_norm`` where a task has it, else ``acc``.

    Raises ValueError naming a task that is missing or has neither metric.
    """
    scores = []
    for task in tasks:
        metrics = results.get(task) or {}
        score = metrics.get("acc_norm", metrics.get("acc"))
        if score is None:
            raise ValueError(f"zero-shot task {task!r} has no acc or acc_norm in the results ({sorted(metrics)}); "
                             f"the papers' average needs both tasks and metrics")
        scores.append(score)
    return {"acc": sum(scores) / len(scores), "samples": float(sum(results[t].get("samples", 0) for t in tasks))}


class EvalExtraMissing(ValueError):
    """Zero-shot tasks were asked for but lm-evaluation-harness is not installed."""


def _lm_eval():
    try:
        import lm_eval
    except ImportError as exc:
        raise EvalExtraMissing(f"zero-shot tasks need lm-evaluation-harness ({exc}); {INSTALL_HINT}") from None
    return lm_eval


def check_tasks(tasks: Sequence[str]) -> None:
    """Fail early (before any model loads): the extra is installed, every task file exists and
    names no code. Named sets (:data:`TASK_SETS`) are expanded first."""
    _lm_eval()
    for task in expand_tasks(tasks)[0]:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise ValueError(f"task file {task} does not exist; give a task YAML or a registered lm_eval task name")
            refuse_code(path)


def refuse_code(path: Path, _seen: frozenset[Path] = frozenset()) -> None:
    """ValueError when the task YAML ``path``, or a file it ``include``s, names Python code
    (``!function``, or any other tag a safe YAML loader does not know)."""
    path = path.resolve()
    if path in _seen:
        return
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise ValueError(f"task file {path} names Python code ({tag.strip()}): rayprune runs no code from task "
                         f"files; use a task without custom functions, or register it with lm_eval yourself after "
                         f"reading its code") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"task file {path} cannot be read as YAML ({exc}); fix or replace it") from None
    include = config.get("include") if isinstance(config, dict) else None
    if isinstance(include, str) and (path.parent / include).is_file():
        refuse_code(path.parent / include, _seen | {path})


@contextlib.contextmanager
def sandboxed_templates(utils: Any) -> Iterator[None]:
    """Render lm_eval's Jinja templates (``utils.env``) in an immutable sandbox while inside."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    original = utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=original.loader, undefined=original.undefined,
                                            keep_trailing_newline=original.keep_trailing_newline)
    sandbox.filters.update(original.filters)
    utils.env = sandbox
    try:
        yield
    finally:
        utils.env = original


def task_spec(task: str) -> str | dict[str, Any]:
    """A local task YAML as a config dict with its data files made absolute; a name unchanged."""
    path = Path(task).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        return task
    if not path.is_file():
        raise ValueError(f"task file {task} does not exist; give a task YAML or a registered lm_eval task name")
    refuse_code(path)
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=False)  # refuse_code: there is no function to resolve
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def absolute(name: str) -> str:
            return name if Path(name).is_absolute() or "://" in name else str(path.parent.resolve() / name)

        if isinstance(files, str):
            files = absolute(files)
        elif isinstance(files, list):
            files = [absolute(f) for f in files]
        else:
            files = {split: absolute(f) if isinstance(f, str) else [absolute(x) for x in f] for split, f in files.items()}
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": files}
    return config


def zero_shot(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str], *,
              batch_size: int = 1, limit: int | None = None, seed: int = 1234) -> dict[str, dict[str, float]]:
    """Zero-shot metrics per task: ``{task: {"acc": x, "acc_stderr": s, ...}}`` (numbers only).

    A named set in ``tasks`` (e.g. ``blockpruner``) runs its tasks and adds ``"<set> average"``:
    ``{"acc": the papers' average (acc_norm where present, else acc), "samples": items}``.
    """
    lm_eval = _lm_eval()
    tasks, sets = expand_tasks(tasks)
    from lm_eval import utils
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = [task_spec(t) for t in tasks]
    manager = TaskManager(include_defaults=any(isinstance(s, str) for s in specs))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with sandboxed_templates(utils):
            output = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=0, limit=limit,
                                             log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                             torch_random_seed=seed, fewshot_random_seed=seed)
    except KeyError as exc:  # an unknown task name
        raise ValueError(f"zero-shot task: {exc.args[0] if exc.args else exc}") from None
    results: dict[str, dict[str, float]] = {}
    for name, metrics in (output or {}).get("results", {}).items():
        # lm_eval keys metrics as "acc,none" (metric, filter); keep the metric, numbers only.
        row = {key.split(",")[0]: float(v) for key, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in key}
        results[name] = {k: v for k, v in row.items() if not math.isnan(v)} | {"samples": _samples(output, name)}
    for name in sets:
        results[f"{name} average"] = paper_average(results, TASK_SETS[name])
    return results


def _samples(output: dict[str, Any], name: str) -> float:
    counts = (output.get("n-samples") or {}).get(name) or {}
    return float(counts.get("effective", counts.get("original", 0)))
