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
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import yaml

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EvalExtraMissing", "check_tasks", "refuse_code", "sandboxed_templates", "task_spec", "zero_shot"]

INSTALL_HINT = "install the optional extra: pip install 'rayprune[eval]' (or pip install -r requirements-eval.txt)"


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
    names no code."""
    _lm_eval()
    for task in tasks:
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
    """Zero-shot metrics per task: ``{task: {"acc": x, "acc_stderr": s, ...}}`` (numbers only)."""
    lm_eval = _lm_eval()
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
    return results


def _samples(output: dict[str, Any], name: str) -> float:
    counts = (output.get("n-samples") or {}).get(name) or {}
    return float(counts.get("effective", counts.get("original", 0)))
