"""LoRA training of a compact model on one data-parallel worker: the loop Ray Train runs.

:class:`LoraTrainer` holds one replica of the compact model (on a CPU, one GPU, or spread over the
worker's GPUs by accelerate's device map) with peft's LoRA adapters, and takes optimizer steps.

Why the loop is written out rather than ``transformers.Trainer``: every worker must take the same
steps on the same sequences whatever the number of workers, and a resumed run must continue
exactly where it stopped. So:

- **data order** is a function of (seed, epoch) alone: epoch e visits the training examples in
  ``numpy.random.default_rng(seed + e).permutation``; global micro-batches of ``batch_size`` are cut
  from that order (an incomplete last one is dropped) and ``grad_accum`` of them make one optimizer
  step. Rank r of w workers takes rows ``[r b/w, (r+1) b/w)`` of each global micro-batch;
- **the loss** of a step is the sum of token losses over every sequence of the global batch divided
  by the number of supervised tokens in it (counted up front from the labels, which every worker
  holds), so 1 worker and 2 workers compute the same gradient up to summation order;
  ``DistributedDataParallel`` averages over workers, which the loss undoes by a factor w;
- **dropout** draws from a generator seeded by (seed, step, rank) at each step, so a step computes
  the same thing whether the run was resumed before it or not;
- **a checkpoint** holds the trainable weights, AdamW's state, the step and every logged step so far
  (``history``), as safetensors and JSON (no pickle), plus the adapter in peft's own format
  (``adapter/``). Loading one and continuing gives the weights an uninterrupted run reaches (bitwise
  on one CPU worker; the tests say so).

The learning rate follows ``transformers.get_linear_schedule_with_warmup`` (``lr * s / warmup``
while ``s < warmup``, then a linear decay to 0 at the last step; ``s`` counts completed steps) and
gradients are clipped to ``max_grad_norm``, as ``transformers.Trainer`` does by default.

Device rules (SPEC section 8): token ids go to the embedding's device; labels go to the device of
the logits; the loss is computed in float32 whatever the replica's dtype; peft keeps the adapters in
float32 over bf16 base weights (``autocast_adapter_dtype``); gradient clipping and AdamW run per
device on the adapters' own devices.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = ["LoraTrainer", "Plan", "StepLog", "lr_factor", "pad_batch"]

IGNORE = -100
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
ADAPTER_DIR = "adapter"


def lr_factor(step: int, warmup: int, total: int) -> float:
    """``get_linear_schedule_with_warmup``'s multiplier after ``step`` completed optimizer steps."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def pad_batch(ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), int64."""
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
    target = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, (x, y) in enumerate(zip(ids, labels)):
        batch[row, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        target[row, : len(y)] = torch.from_numpy(np.asarray(y, dtype=np.int64))
        mask[row, : len(x)] = 1
    return batch, mask, target


def supervised_tokens(labels: np.ndarray) -> int:
    """Tokens a causal LM is scored on: label positions 1.. that are not -100 (the first predicts nothing)."""
    return int(np.count_nonzero(np.asarray(labels)[1:] != IGNORE))


@dataclass(frozen=True)
class Plan:
    """Which examples each optimizer step trains on (a function of the settings and the data size)."""

    examples: int
    batch_size: int  # global micro-batch
    grad_accum: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def micro_per_epoch(self) -> int:
        return self.examples // self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.examples} training examples do not fill one optimizer step of "
                             f"{self.batch_size} x {self.grad_accum} sequences; lower recovery.batch_size or "
                             f"recovery.grad_accum, or give more data")

    def micro_batches(self, step: int) -> list[np.ndarray]:
        """The global micro-batches (example indices) of optimizer step ``step`` (0-based); past the
        last epoch the order goes on with the next epoch's permutation."""
        out = []
        for k in range(self.grad_accum):
            micro = step * self.grad_accum + k
            epoch, index = divmod(micro, self.steps_per_epoch * self.grad_accum)
            order = np.random.default_rng(self.seed + epoch).permutation(self.examples)
            out.append(order[index * self.batch_size: (index + 1) * self.batch_size])
        return out


@dataclass
class StepLog:
    step: int  # completed optimizer steps
    loss: float  # mean token loss of the step (every worker's tokens)
    lr: float
    tokens: int  # tokens trained on so far (padding excluded), every worker
    seconds: float  # training time so far, this run and the runs it resumed
    val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class LoraTrainer:
    """One worker's replica, optimizer and position in the plan (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, settings: Mapping[str, Any], train: tuple[list, list],
                 val: tuple[list, list], *, pad_id: int, rank: int = 0, world: int = 1,
                 distributed: bool = False) -> None:
        import peft

        self.settings, self.rank, self.world = dict(settings), rank, world
        self.train_ids, self.train_labels = train
        self.val_ids, self.val_labels = val
        self.pad_id = pad_id
        if settings["batch_size"] % world:
            raise ValueError(f"batch_size {settings['batch_size']} is not a multiple of {world} workers")
        self.local = settings["batch_size"] // world
        self.plan = Plan(len(self.train_ids), settings["batch_size"], settings["grad_accum"], settings["epochs"],
                         settings.get("max_steps"), settings["seed"])
        self.plan.check()
        for p in model.parameters():
            p.requires_grad_(False)
        lora = peft.LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                               target_modules=list(settings["targets"]), task_type="CAUSAL_LM", bias="none")
        torch.manual_seed(settings["seed"])  # the adapters' initialisation: the same on every worker
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            self.peft_model = peft.get_peft_model(model, lora, autocast_adapter_dtype=True)
        self.model: torch.nn.Module = self.peft_model
        if distributed and world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # device_ids=None: a module on a CPU or spread over several GPUs (accelerate's map)
            self.model = DistributedDataParallel(self.peft_model, device_ids=None)
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.names = [n for n, p in self.peft_model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings["lr"], weight_decay=settings["weight_decay"])
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []  # every logged step so far (checkpointed: a resumed log is whole)
        self.input_device = self.peft_model.get_input_embeddings().weight.device

    # ---- one optimizer step ----------------------------------------------------------------------
    def _rows(self, micro: np.ndarray) -> np.ndarray:
        return micro[self.rank * self.local: (self.rank + 1) * self.local]

    def _loss_sum(self, model: torch.nn.Module, ids: Sequence[np.ndarray],
                  labels: Sequence[np.ndarray]) -> tuple[torch.Tensor, int, int]:
        """Summed token loss of a batch (fp32 logits, on their device), its tokens and its supervised tokens."""
        batch, mask, target = pad_batch(ids, labels, self.pad_id)
        logits = model(input_ids=batch.to(self.input_device), attention_mask=mask.to(self.input_device)).logits
        target = target[:, 1:].to(logits.device)
        loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), target.flatten(),
                                                     ignore_index=IGNORE, reduction="sum")
        return loss_sum, int(mask.sum()), int((target != IGNORE).sum())

    def _forward_loss(self, rows: np.ndarray, scale: float) -> tuple[torch.Tensor, int]:
        loss_sum, tokens, _ = self._loss_sum(self.model, [self.train_ids[i] for i in rows],
                                             [self.train_labels[i] for i in rows])
        return loss_sum * scale, tokens

    def train_step(self) -> StepLog:
        """Optimizer step ``self.step`` (then ``self.step`` moves on); its log line."""
        import contextlib

        start = time.perf_counter()
        micros = self.plan.micro_batches(self.step)
        supervised = sum(supervised_tokens(self.train_labels[i]) for micro in micros for i in micro)
        factor = lr_factor(self.step, self.settings["warmup_steps"], self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings["lr"] * factor
        generator_seed = (self.settings["seed"] * 1_000_003 + self.step) * 1_009 + self.rank
        torch.manual_seed(generator_seed)  # dropout: a function of (seed, step, rank)
        self.model.train()
        loss_total, tokens = 0.0, 0
        scale = self.world / max(1, supervised)  # DDP averages over workers; undo it
        for k, micro in enumerate(micros):
            last = k == len(micros) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, n = self._forward_loss(self._rows(micro), scale)
                loss.backward()
            loss_total += float(loss.detach()) / self.world
            tokens += n
        loss_total, tokens = self._all_sum(loss_total, tokens)
        if self.settings["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings["max_grad_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        self.seconds += time.perf_counter() - start
        return StepLog(self.step, loss_total, self.settings["lr"] * factor, self.tokens, self.seconds)

    def _all_sum(self, loss: float, tokens: int) -> tuple[float, int]:
        """The step's loss and tokens over every worker (each holds its share)."""
        if self.world == 1 or not torch.distributed.is_initialized():
            return loss, tokens
        # NCCL reduces GPU tensors only; gloo (CPU workers) host ones
        device = self.input_device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        both = torch.tensor([loss, float(tokens)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(both)
        return float(both[0]), int(both[1])

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean token loss over the validation examples (every worker computes it whole)."""
        if not self.val_ids:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(self.val_ids), max(1, self.local)):
            stop = start + max(1, self.local)
            loss_sum, _, supervised = self._loss_sum(self.peft_model, self.val_ids[start:stop],
                                                     self.val_labels[start:stop])
            total += float(loss_sum)
            count += supervised
        return total / max(1, count)

    def run(self, *, on_log: Callable[[StepLog], None] = lambda log: None,
            on_checkpoint: Callable[[StepLog], None] = lambda log: None) -> StepLog | None:
        """Train from ``self.step`` to the plan's last step: ``on_log`` every ``log_every`` steps (and
        the last), ``on_checkpoint`` every ``checkpoint_every`` steps and at the end."""
        log = None
        total = self.plan.total_steps
        while self.step < total:
            log = self.train_step()
            done = self.step == total
            checkpoint = done or self.step % self.settings["checkpoint_every"] == 0
            if checkpoint:
                log.val_loss = self.validation_loss()
            if done or self.step % self.settings["log_every"] == 0 or checkpoint:
                self.history.append(log.to_dict())
                on_log(log)
            if checkpoint:
                on_checkpoint(log)
        return log

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self, directory: str | Path, log: StepLog | None = None) -> None:
        """Trainable weights, AdamW state, step and counters, and the adapter in peft's format."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().to("cpu").contiguous() for n, p in zip(self.names, self.params)},
                  str(directory / TRAINABLE_FILE))
        state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
        save_file(tensors, str(directory / OPTIMIZER_FILE))
        (directory / STATE_FILE).write_text(json.dumps({
            "step": self.step, "tokens": self.tokens, "seconds": self.seconds, "total_steps": self.plan.total_steps,
            "param_groups": state["param_groups"], "names": self.names, "log": log.to_dict() if log else None,
            "history": self.history,
        }, indent=1))
        self.peft_model.save_pretrained(str(directory / ADAPTER_DIR))

    def load(self, directory: str | Path) -> None:
        """Continue from a checkpoint written by :meth:`save` (by any number of workers)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / STATE_FILE).read_text())
        if meta["names"] != self.names:
            raise ValueError(f"checkpoint {directory} holds other adapters ({len(meta['names'])} tensors, e.g. "
                             f"{meta['names'][:1]}) than this model ({len(self.names)}); start afresh")
        weights = load_file(str(directory / TRAINABLE_FILE))
        with torch.no_grad():
            for name, param in zip(self.names, self.params):
                param.copy_(weights[name].to(param.device))
        flat = load_file(str(directory / OPTIMIZER_FILE))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            index, _, field = key.partition(".")
            state.setdefault(int(index), {})[field] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step, self.tokens, self.seconds = meta["step"], meta["tokens"], meta["seconds"]
        self.history = [entry for entry in meta.get("history", []) if entry["step"] <= self.step]

