"""The settings of a recovery fine-tuning (``rayprune recover``, or a campaign's ``recovery:`` section).

The defaults are MultiPruner's recovery recipe (its ``recovery/finetune.py`` as the paper ran it):
a LoRA with r=16 and alpha=32 (dropout 0.05) on every q/k/v/o/gate/up/down projection, Alpaca in
its instruction template with the prompt tokens masked out of the loss, sequences cut at 256 tokens,
micro-batches of 8 with 4 accumulation steps (a global batch of 32), lr 1e-4 after 100 warm-up
steps, 2 epochs, 2,000 rows held out for validation (split with seed 42).

``batch_size`` is the *global* micro-batch: it is shared out among ``workers``, so a 1-worker and a
2-worker run with the same settings take the same optimizer steps on the same sequences.

Checks and messages follow the campaign config's (:mod:`orchestrator.config_load`): every problem in
one :class:`~orchestrator.config.ConfigError`, each naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from .config import ConfigError
from .config_checks import BadValue, _bool, _dtype, _float, _int, _one_of, _optional_string, _string
from .config_walk import _apply_override, _build

__all__ = ["DEFAULT_TARGETS", "RECOVERY_SCHEMA", "RecoveryConfig", "build_recovery", "load_recovery"]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: MultiPruner's recovery data: the cleaned Alpaca (alpaca-lora's ``yahma/alpaca-cleaned``).
DEFAULT_DATA = "hf:yahma/alpaca-cleaned:train"


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    """One LoRA recovery of a compact model (see the module docstring for the defaults' source)."""

    # what is trained: RUN/model (null), or a directory relative to the run (model-step-7) or absolute
    model: str | None = None
    # data: an Alpaca-format JSONL/JSON file, hf:NAME:SPLIT (Alpaca columns), a text corpus (a preset,
    # a text file, hf:NAME:SPLIT:COLUMN), or run: the campaign's own corpus (its train split)
    data: str = DEFAULT_DATA
    format: str = "auto"  # auto | alpaca | text (auto: .jsonl/.json and hf:NAME:SPLIT are alpaca)
    max_length: int = 256  # tokens per sequence (Alpaca rows are truncated, text is cut into windows)
    val_rows: int = 2000  # examples held out for the validation loss (0: none)
    # LoRA
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # optimisation (AdamW, linear warm-up then linear decay to 0, as transformers.Trainer)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8  # global micro-batch, shared out among the workers
    grad_accum: int = 4
    epochs: int = 2
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    seed: int = 42
    # bookkeeping
    log_every: int = 10  # optimizer steps per loss line
    checkpoint_every: int = 50  # optimizer steps per Ray Train checkpoint (and at the end)
    keep_checkpoints: int = 2
    # where it runs: DDP workers, each a Ray Train worker with these resources
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # above 1: the model is spread over the worker's GPUs
    dtype: str = "auto"  # of the frozen base weights: auto = bf16 on a GPU with native bf16, fp32 on a CPU
    # held-out figures after training (the run's data.evaluation windows) and the merged model
    evaluate: bool = True
    merge_dtype: str = "float32"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["targets"] = list(self.targets)
        return out


def _targets(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise BadValue(f"is not a list of module names; use e.g. {path}=[q_proj,v_proj] or {path}=q_proj,v_proj")
    return tuple(dict.fromkeys(value))


def _dropout(value: Any, path: str) -> float:
    number = _float(0.0, "0.05", strict=False)(value, path)
    if number >= 1.0:
        raise BadValue(f"must be below 1 (a probability); use e.g. {path}=0.05")
    return number


def _merge_dtype(value: Any, path: str) -> str:
    return _one_of(("float32", "bfloat16", "float16"))(value, path)


RECOVERY_SCHEMA = (RecoveryConfig, {
    "model": _optional_string,
    "data": _string("run"),
    "format": _one_of(("auto", "alpaca", "text")),
    "max_length": _int(2, 256),
    "val_rows": _int(0, 2000),
    "r": _int(1, 16),
    "alpha": _float(0.0, "32", strict=True),
    "dropout": _dropout,
    "targets": _targets,
    "lr": _float(0.0, "1e-4", strict=True),
    "weight_decay": _float(0.0, "0.0", strict=False),
    "batch_size": _int(1, 8),
    "grad_accum": _int(1, 4),
    "epochs": _int(1, 2),
    "max_steps": _int(1, 200, optional=True),
    "warmup_steps": _int(0, 100),
    "max_grad_norm": _float(0.0, "1.0", strict=False),
    "seed": _int(0, 42),
    "log_every": _int(1, 10),
    "checkpoint_every": _int(1, 50),
    "keep_checkpoints": _int(1, 2),
    "workers": _int(1, 2),
    "cpus_per_worker": _float(0.0, "1", strict=True),
    "gpus_per_worker": _float(0.0, "1", strict=False),
    "dtype": _dtype,
    "evaluate": _bool,
    "merge_dtype": _merge_dtype,
})


def build_recovery(raw: Mapping[str, Any] | None, path: str = "recovery.") -> tuple[RecoveryConfig | None, list[str]]:
    """The settings from a raw mapping (unset keys: the defaults) and the problems found, one line each."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return None, [f"{path.rstrip('.')}: {raw!r} is not a section; write it as a mapping of keys"]
    problems: list[str] = []
    config = _build(RECOVERY_SCHEMA, raw, path, None, problems, {})
    if config is not None:
        if config.batch_size % config.workers:
            problems.append(f"{path}batch_size {config.batch_size}: the global micro-batch is shared out among "
                            f"{path}workers={config.workers}, so it must be a multiple of it; use e.g. "
                            f"{path}batch_size={config.workers * max(1, config.batch_size // config.workers)}")
        if config.gpus_per_worker > 1 and config.gpus_per_worker != int(config.gpus_per_worker):
            problems.append(f"{path}gpus_per_worker {config.gpus_per_worker:g}: above 1 it must be whole (the model "
                            f"is spread over that many GPUs); use e.g. {path}gpus_per_worker=2")
    return (None if problems else config), problems


def load_recovery(base: Mapping[str, Any] | None, overrides: Iterable[str]) -> RecoveryConfig:
    """``base`` (a campaign's ``recovery:`` section, or None) with ``key=value`` overrides applied;
    keys may carry a ``recovery.`` prefix. Raises one ConfigError listing every problem."""
    raw: dict[str, Any] = dict(base or {})
    problems = []
    for override in overrides:
        key, sep, value = override.partition("=")
        problem = _apply_override(raw, f"{key.strip().removeprefix('recovery.')}{sep}{value}")
        if problem:
            problems.append(problem)
    config, more = build_recovery(raw)
    problems += more
    if problems or config is None:
        raise ConfigError(problems)
    return config
