"""The recovery's Ray Train worker: place a replica of the compact model, train, report checkpoints.

Ray Train's ``TorchTrainer`` runs :func:`train_loop_per_worker` on every worker and has already
joined them in a ``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs). Each worker:

1. places its replica: on the CPU (``gpus_per_worker`` 0, with ``cpus_per_worker`` torch threads),
   on its one GPU, or spread over its GPUs with accelerate's balanced device map (whole decoder
   layers per GPU, as an evaluator replica is spread: :func:`actors.sizing.device_map`), in the
   recovery's dtype (``auto``: bf16 on a GPU with native bf16, fp32 on a CPU);
2. takes the token data from the object store (the driver tokenized it once);
3. continues from Ray Train's latest checkpoint when there is one: a rerun of the same command
   (Ray Train restores a run from its storage directory) or a worker restarted after a failure;
4. trains (:class:`actors.lora_train.LoraTrainer`); rank 0 sends each log line to the driver's
   queue (its progress bar and ``log.jsonl``) and writes each checkpoint, which every worker
   reports to Ray Train together.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Mapping

import numpy as np

__all__ = ["place_replica", "train_loop_per_worker", "unflatten"]

log = logging.getLogger("rayprune")


def unflatten(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Ragged rows back from one flat array and its row offsets (``len(rows) + 1`` of them)."""
    return [flat[offsets[i]: offsets[i + 1]].astype(np.int64) for i in range(len(offsets) - 1)]


def place_replica(model_dir: str, dtype: str, devices: list[Any], cpus: float) -> Any:
    """The compact model on ``devices`` (torch devices: a CPU, one GPU, or several GPUs to spread it
    over) in ``dtype`` (a setting: auto, bfloat16, float16, float32)."""
    import torch

    from .export import load_pruned
    from .models import resolve_dtype

    torch_dtype = resolve_dtype(dtype, devices[0].type)  # the worker's GPUs are alike
    if devices[0].type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))
    model = load_pruned(model_dir).to(torch_dtype)
    if len(devices) == 1:
        return model.to(devices[0])
    from accelerate import dispatch_model

    from .sizing import device_map

    memory = {d.index: torch.cuda.get_device_properties(d.index).total_memory for d in devices}
    return dispatch_model(model, device_map(model, memory, str(torch_dtype).removeprefix("torch.")))


def _devices(gpus: float) -> list[Any]:
    import torch

    if gpus <= 0:
        return [torch.device("cpu")]
    import ray.train.torch

    return list(ray.train.torch.get_devices())


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """Ray Train's entry point; ``config`` is the driver's ``train_loop_config``."""
    import ray
    import ray.train

    from .lora_train import LoraTrainer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings = config["settings"]
    model = place_replica(config["model_dir"], settings["dtype"], _devices(settings["gpus_per_worker"]),
                          settings["cpus_per_worker"])
    data = ray.get(config["data"])
    trainer = LoraTrainer(model, settings, (unflatten(*data["train"]), unflatten(*data["train_labels"])),
                          (unflatten(*data["val"]), unflatten(*data["val_labels"])), pad_id=config["pad_id"],
                          rank=rank, world=world, distributed=world > 1)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    queue = config.get("queue")
    if rank == 0 and queue is not None:
        queue.put({"event": "start", "step": trainer.step, "total": trainer.plan.total_steps,
                   "tokens": trainer.tokens, "seconds": trainer.seconds, "history": trainer.history})

    def on_log(entry) -> None:
        if rank == 0 and queue is not None:
            queue.put({"event": "log", **entry.to_dict()})

    def on_checkpoint(entry) -> None:
        metrics = {"step": entry.step, "loss": entry.loss, "tokens": entry.tokens, "seconds": entry.seconds,
                   **({"val_loss": entry.val_loss} if entry.val_loss is not None else {})}
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                trainer.save(directory, entry)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0
                             else None)

    trainer.run(on_log=on_log, on_checkpoint=on_checkpoint)
