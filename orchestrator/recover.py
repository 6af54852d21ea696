"""``rayprune recover RUN``: LoRA fine-tuning of a run's compact model on Ray Train, then merge and measure.

Everything lives in ``RUN/recovery/``:

- ``settings.json``: the settings that decide what is trained (a rerun must match them to resume);
- ``data/``: the tokenized training and validation examples (Parquet) and ``data.json``, their counts;
- ``ray/``: Ray Train's storage (its checkpoints: adapters, AdamW state and step; no pickle);
- ``log.jsonl``: one line per logged step (loss, lr, tokens, seconds, validation loss at checkpoints);
- ``adapter/``: the final LoRA adapter (peft's format), ``model/``: the adapter merged into a compact
  model that :func:`actors.export.load_pruned` (stock transformers classes) loads;
- ``result.json``: held-out perplexity of dense, pruned and recovered on the run's own held-out
  windows, tokens trained on, wall time, zero-shot accuracy with ``--tasks``; ``loss.png``; and the
  run's ``report.md`` gains a recovery section.

Order of work: every check that can fail (the model, the LoRA targets, the data, resumability)
runs before Ray starts. Killing the command and running it again continues from Ray Train's latest
checkpoint (Ray Train restores a run from its storage directory), not from step 0. Training never
sees the held-out windows: the run's own corpus is read from its train split (the windows come from
its test split), and any example that shares a 32-token span with a held-out window is dropped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .files import atomic_write
from .recovery_config import DEFAULT_TARGETS, RecoveryConfig
from .report_recovery import read_log

log = logging.getLogger("rayprune")

__all__ = ["RecoveryError", "read_log", "recover", "recovery_model_dir", "recovery_summary"]

#: Settings that change what is trained: a rerun must keep them to resume (the others may change:
#: workers, logging, checkpoint spacing, evaluation).
TRAINING_KEYS = ("model", "data", "format", "max_length", "val_rows", "r", "alpha", "dropout", "targets", "lr",
                 "weight_decay", "batch_size", "grad_accum", "epochs", "max_steps", "warmup_steps", "max_grad_norm",
                 "seed", "dtype")


class RecoveryError(ValueError):
    """A recovery cannot start; the message names the problem and the fix."""


def recovery_model_dir(run_dir: Path, settings: RecoveryConfig) -> Path:
    """The compact model a recovery trains, checked: ``RUN/model``, or ``recovery.model`` (relative to the run)."""
    from actors.export import _has_rayprune_config

    from .rundir import RunDir

    if not run_dir.is_dir():
        raise RecoveryError(f"{run_dir} is not a directory; give the run directory of a campaign (e.g. runs/demo)")
    model_dir = run_dir / "model" if settings.model is None else (run_dir / settings.model)
    if settings.model is not None and Path(settings.model).is_absolute():
        model_dir = Path(settings.model)
    if not _has_rayprune_config(model_dir):
        fix = (f"write it with `rayprune export {run_dir}` (or `--step K` for an earlier step, then "
               f"recovery.model=model-step-K)" if settings.model is None else
               "give recovery.model a compact export written by `rayprune export`")
        raise RecoveryError(f"{model_dir} is not a compact model (no config.json with a 'rayprune' entry): "
                            f"nothing to fine-tune; {fix}")
    rundir = RunDir(run_dir)
    if rundir.has_path():
        stale = [p for p in rundir.stale_artefacts() if p.startswith(f"{model_dir.name}/")]
        if stale:
            raise RecoveryError(f"{run_dir}: {stale[0]}; a recovery would fine-tune the wrong model")
    return model_dir


def model_identity(model_dir: Path) -> str:
    """What the compact model is (its ``rayprune`` entry: dense model, mask, refits, channel order),
    hashed: a re-export of another mask to the same directory is another model to recover."""
    import hashlib

    entry = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["rayprune"]
    entry = {k: v for k, v in entry.items() if k != "recovery"}
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]


def _recorded_settings(settings: RecoveryConfig, model_dir: Path) -> dict[str, Any]:
    return {**settings.to_dict(), "model_identity": model_identity(model_dir)}


def _settings_problem(recovery_dir: Path, now: dict[str, Any]) -> str | None:
    file = recovery_dir / "settings.json"
    if not file.is_file():
        return None
    before = json.loads(file.read_text(encoding="utf-8"))
    changed = [k for k in (*TRAINING_KEYS, "model_identity") if before.get(k) != now.get(k)]
    if not changed:
        return None
    shown = ", ".join("the compact model (another one was exported since)" if k == "model_identity" else
                      f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
    return (f"{recovery_dir} was trained with other settings ({shown}); rerun with the earlier ones to resume "
            f"it, or add --fresh to start over (the earlier recovery is moved to {recovery_dir.parent}/history/)")


def _prepare_data(model_dir: Path, run_config: dict[str, Any], settings: RecoveryConfig, recovery_dir: Path):
    """Tokenized examples (built once, then read back on a rerun), the pad id and the held-out settings."""
    from actors.models import load_tokenizer

    from .data.windows import heldout_windows
    from .eval_model import _run_evaluation
    from .recovery_data import build_examples, read_examples, write_examples

    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    evaluation = _run_evaluation(run_config) if run_config else None
    data_dir = recovery_dir / "data"
    stats_file = data_dir / "data.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        train, val = read_examples(data_dir / "train.parquet"), read_examples(data_dir / "val.parquet")
        return train, val, stats, pad_id
    heldout = None
    if evaluation is not None:
        heldout = heldout_windows(tokenizer, evaluation["corpus"], evaluation.get("sequences"),
                                  int(evaluation.get("length", 256)), int(evaluation.get("seed", 1234)),
                                  protocol=evaluation.get("protocol", "rayprune"))
    run_corpus = (run_config.get("data") or {}).get("corpus") if run_config else None
    examples = build_examples(tokenizer, settings.data, fmt=settings.format, run_corpus=run_corpus,
                              max_length=settings.max_length, val_rows=settings.val_rows, seed=settings.seed,
                              heldout=heldout)
    write_examples(data_dir / "train.parquet", examples.train_ids, examples.train_labels)
    write_examples(data_dir / "val.parquet", examples.val_ids, examples.val_labels)
    atomic_write(stats_file, json.dumps(examples.stats, indent=1))
    return ((examples.train_ids, examples.train_labels), (examples.val_ids, examples.val_labels), examples.stats,
            pad_id)


def _flatten(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
    return flat, offsets


class _Progress:
    """Drains the workers' log queue: a bar with ETA on a terminal, one log line per entry otherwise;
    every entry also goes to ``log.jsonl`` (rewritten from the checkpoint's history at a (re)start)."""

    def __init__(self, queue: Any, log_file: Path, enabled: bool) -> None:
        self.queue, self.log_file = queue, log_file
        self.bar_on = enabled and sys.stderr.isatty()
        self.bar = None
        self.started_at: int | None = None  # the step training (re)started from
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="recovery-progress", daemon=True)

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._drain()
        if self.bar is not None:
            self.bar.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._drain(wait=0.5)

    def _drain(self, wait: float = 0.0) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                entry = self.queue.get(block=wait > 0, timeout=wait or None)
            except Empty:
                return
            except Exception:  # the queue's actor is gone (Ray shutting down): nothing more will come
                return
            self._handle(entry)
            wait = 0.0

    def _handle(self, entry: dict[str, Any]) -> None:
        from tqdm import tqdm

        if entry.get("event") == "start":
            if self.started_at is None:
                self.started_at = entry["step"]
            self._restart(entry["step"], entry.get("history"))
            if self.bar_on:
                self.bar = tqdm(total=entry["total"], initial=entry["step"], desc="recovery", unit="step")
            log.info("recovery: step %d of %d%s", entry["step"], entry["total"],
                     " (resumed from a checkpoint)" if entry["step"] else "")
            return
        line = {k: v for k, v in entry.items() if k != "event"}
        with open(self.log_file, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.bar is not None:
            self.bar.update(line["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{line['loss']:.4f}")
        else:
            log.info("recovery: step %d, loss %.4f%s, lr %.2e, %s tokens, %.0f s", line["step"], line["loss"],
                     f", val {line['val_loss']:.4f}" if "val_loss" in line else "", line["lr"],
                     f"{line['tokens']:,}", line["seconds"])

    def _restart(self, step: int, history: list[dict[str, Any]] | None) -> None:
        """The log as of the step training (re)starts from: the checkpoint's own history of logged steps
        (lines this driver never got to write before it was killed come back), or, from a checkpoint
        without one, the lines up to that step (a torn last line goes too)."""
        if history is None:
            logged = read_log(self.log_file) if self.log_file.is_file() else []
            history = [entry for entry in logged if entry.get("step", 0) <= step]
        atomic_write(self.log_file, "".join(json.dumps(entry) + "\n" for entry in history))


def _fit(model_dir: Path, settings: RecoveryConfig, train, val, pad_id: int, recovery_dir: Path,
         progress: bool) -> tuple[Any, int | None]:
    """Ray Train's fit: its result (the latest checkpoint), and the step training started from."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from actors.lora_worker import train_loop_per_worker

    data = ray.put({"train": _flatten(train[0]), "train_labels": _flatten(train[1]),
                    "val": _flatten(val[0]), "val_labels": _flatten(val[1])})
    queue = Queue(actor_options={"num_cpus": 0})
    gpus = settings.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings.to_dict(), "model_dir": str(model_dir.resolve()), "data": data,
                           "pad_id": int(pad_id), "queue": queue},
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": settings.cpus_per_worker,
                                                           **({"GPU": gpus} if gpus > 0 else {})}),
        run_config=RunConfig(name="ray", storage_path=str(recovery_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=settings.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=2)),
    )
    try:
        with _Progress(queue, recovery_dir / "log.jsonl", progress) as shown:
            return trainer.fit(), shown.started_at
    finally:
        ray.kill(queue.actor)


def _evaluate(model_dir: Path, tokenizer_dir: Path, run_config: dict[str, Any], tasks: Sequence[str],
              label: str) -> dict[str, Any]:
    from actors.export import load_pruned
    from actors.models import load_tokenizer

    from .eval_model import Target, _run_evaluation, evaluate_model

    target = Target(load_pruned(model_dir), load_tokenizer(tokenizer_dir), label, str(model_dir),
                    _run_evaluation(run_config) if run_config else {})
    return evaluate_model(target, tasks=tasks)


def _effective_targets(settings: RecoveryConfig, model_config: dict[str, Any]) -> RecoveryConfig:
    """``settings`` with the LoRA targets the model has: the default set shrinks to the projections a
    pruning left (every MLP removed: no gate/up/down_proj); targets a user named must all exist."""
    import dataclasses

    from actors.lora_merge import check_targets, lora_targets

    if tuple(settings.targets) == DEFAULT_TARGETS:
        present = tuple(t for t in DEFAULT_TARGETS if t in lora_targets(model_config))
        if present != DEFAULT_TARGETS:
            log.info("LoRA targets: %s (the pruned model has no %s)", ", ".join(present),
                     ", ".join(sorted(set(DEFAULT_TARGETS) - set(present))))
            settings = dataclasses.replace(settings, targets=present or DEFAULT_TARGETS)
    check_targets(model_config, settings.targets)
    return settings


def recover(run_dir: str | Path, settings: RecoveryConfig, *, tasks: Sequence[str] = (), progress: bool = True,
            fresh: bool = False) -> dict[str, Any]:
    """Fine-tune ``run_dir``'s compact model with LoRA (see the module docstring); the result dict
    (also ``RUN/recovery/result.json``)."""
    from actors.lora_merge import merge_adapter
    from cluster.session import connect

    from .report import write_report
    from .rundir import RunDir

    run_dir = Path(run_dir)
    model_dir = recovery_model_dir(run_dir, settings)
    settings = _effective_targets(settings, json.loads((model_dir / "config.json").read_text(encoding="utf-8")))
    recovery_dir = run_dir / "recovery"
    if fresh and recovery_dir.exists():
        target = run_dir / "history" / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        recovery_dir.rename(target)
        log.info("the earlier recovery was moved to %s", target)
    recorded = _recorded_settings(settings, model_dir)
    if problem := _settings_problem(recovery_dir, recorded):
        raise RecoveryError(problem)
    done = recovery_dir / "result.json"
    if done.is_file() and not tasks:
        log.info("%s is complete (same settings); its result is reused (--fresh trains again)", recovery_dir)
        return json.loads(done.read_text(encoding="utf-8"))
    if tasks:
        from actors.zeroshot import check_tasks

        check_tasks(tasks)
    run_config = RunDir(run_dir).read_config()  # {} without config.yaml
    recovery_dir.mkdir(parents=True, exist_ok=True)
    train, val, stats, pad_id = _prepare_data(model_dir, run_config, settings, recovery_dir)
    if len(train[0]) < settings.batch_size * settings.grad_accum:
        raise RecoveryError(f"{len(train[0])} training examples do not fill one optimizer step of "
                            f"{settings.batch_size} x {settings.grad_accum} sequences; lower recovery.batch_size or "
                            f"recovery.grad_accum, or give more data")
    atomic_write(recovery_dir / "settings.json", json.dumps(recorded, indent=1))

    connect(num_cpus=max(1, math.ceil(settings.workers * settings.cpus_per_worker)), namespace="rayprune")
    start = time.perf_counter()
    result, started_at = _fit(model_dir, settings, train, val, pad_id, recovery_dir, progress)
    wall = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"recovery training failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "state.json").read_text())
        adapter = recovery_dir / "adapter"
        staging = recovery_dir / ".adapter-staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(Path(directory) / "adapter", staging)
        shutil.rmtree(adapter, ignore_errors=True)
        staging.rename(adapter)
    merged = merge_adapter(model_dir, adapter, recovery_dir / "model", dtype=settings.merge_dtype)
    log.info("merged model written to %s", merged)

    summary: dict[str, Any] = {
        "model": str(model_dir), "merged": str(merged), "adapter": str(adapter), "data": stats,
        "settings": settings.to_dict(),
        "train": {"steps": state["step"], "total_steps": state["total_steps"], "tokens_trained": state["tokens"],
                  "seconds": state["seconds"], "wall_this_run": wall, "final_loss": (state.get("log") or {}).get("loss"),
                  "final_val_loss": (state.get("log") or {}).get("val_loss"), "workers": settings.workers,
                  "resumed_from_step": started_at or 0},
        "heldout": None, "tasks": None, "date": time.strftime("%Y-%m-%d"),
    }
    if settings.evaluate or tasks:
        rundir = RunDir(run_dir)
        path = rundir.read_path() if rundir.has_path() else {}
        pruned = _evaluate(model_dir, model_dir, run_config, tasks, "compact export")
        recovered = _evaluate(merged, model_dir, run_config, tasks, "recovered export")
        held = pruned["heldout"]
        summary["heldout"] = {"dense": (path.get("heldout") or {}).get("dense_ppl"), "pruned": held["ppl"],
                              "recovered": recovered["heldout"]["ppl"], "windows": held["windows"],
                              "length": held["length"], "corpus": held["corpus"], "protocol": held["protocol"]}
        if tasks:
            summary["tasks"] = {"pruned": pruned.get("tasks"), "recovered": recovered.get("tasks")}
    atomic_write(recovery_dir / "result.json", json.dumps(summary, indent=1))
    if RunDir(run_dir).has_path():
        write_report(run_dir)
    return summary


def recovery_summary(result: dict[str, Any]) -> str:
    """What ``rayprune recover`` prints at the end."""
    train, data = result["train"], result["data"]
    lines = ["", f"Recovery: {train['steps']} steps, {train['tokens_trained']:,} tokens trained on "
                 f"({data.get('train_examples', '?')} examples from {data.get('source', '?')}, {data.get('format', '?')}), "
                 f"{train['seconds']:.0f} s on {train['workers']} worker(s); final loss {train['final_loss']:.4f}"
             if train.get("final_loss") is not None else f"Recovery: {train['steps']} steps"]
    held = result.get("heldout")
    if held:
        dense = f"dense {held['dense']:.3f}, " if held.get("dense") is not None else ""
        change = 100.0 * (held["recovered"] - held["pruned"]) / held["pruned"]
        lines.append(f"Held-out perplexity ({held['corpus']}, {held['windows']} x {held['length']} tokens): {dense}"
                     f"pruned {held['pruned']:.3f} -> recovered {held['recovered']:.3f} ({change:+.1f}%)")
    for task, metrics in ((result.get("tasks") or {}).get("recovered") or {}).items():
        before = ((result["tasks"].get("pruned") or {}).get(task) or {}).get("acc")
        if "acc" in metrics:
            lines.append(f"{task}: acc {before if before is None else f'{before:.4f}'} -> {metrics['acc']:.4f}")
    lines += [f"Adapter: {result['adapter']}", f"Merged model: {result['merged']} "
              f"(load it with actors.export.load_pruned, or evaluate it with `rayprune eval {result['merged']}`)"]
    return "\n".join(lines)
