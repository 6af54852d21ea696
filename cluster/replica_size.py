"""``cluster.gpus_per_actor``, resolved to a number before the evaluator pool starts.

``auto`` picks the fewest GPUs that hold the model in the campaign's dtype plus the engine's working
memory (:mod:`actors.sizing`: accelerate's device map on the meta device, no weights loaded), on
GPUs of ``cluster.gpu_memory_gb`` (``auto``: the memory of the cluster's GPUs, asked from one of
them), never more than one node has. On a cluster without GPUs ``auto`` is 0: CPU replicas.

A fixed number of 1 or more GPUs is checked the same way, so a replica that would offload weights to
``cpu``/``disk`` is refused before the campaign (:class:`~actors.sizing.ReplicaTooLarge`), not after
minutes of loading. Fractions below one GPU and 0 are taken as given.

Where the GPUs are: with Ray connected or ``RAY_ADDRESS`` set, the cluster's nodes (joining it, as
the pool would); else this machine, where the private session will run, asked in a short subprocess
so that the driver never holds a CUDA context.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("rayprune")

#: What the probe runs: the GPU count and the total memory of GPU 0 (JSON on stdout).
_PROBE = ("import json, torch; n = torch.cuda.device_count(); "
          "print(json.dumps([n, torch.cuda.get_device_properties(0).total_memory if n else None]))")


@dataclass(frozen=True)
class GpuInventory:
    """The most GPUs on one node (0: none), and the memory of one GPU in bytes (None: unknown)."""

    gpus_per_node: int
    gpu_bytes: int | None


def working_memory_of(config: Any, arch_config: dict, gpu_bytes: int) -> Any:
    """The engine's working memory of one GPU replica for a campaign ``config`` (``orchestrator.config.Config``):
    its batch size, the longer of its calibration and evaluation windows and, for SPRINT, its
    calibration windows, ``top_k``, checkpoint interval, ``refit_target`` and ``reference`` (the
    streams a step keeps depend on both: ``search_spaces.memory.sprint_memory``). For SPRINT a function of the replica's
    GPU count k: its checkpoints stay on the device up to the memory budget of k GPUs of
    ``gpu_bytes`` (``actors.sizing.sprint_checkpoint_budget``) and move to host memory beyond it."""
    from actors.sizing import sprint_checkpoint_budget, working_for

    data, search = config.data, config.search
    tokens = max(data.calibration.length, data.evaluation.length)
    plain = {"batch_size": search.batch_size, "tokens": tokens}
    if search.method != "sprint":
        return working_for(arch_config, config.dtype, **plain)
    settings = search.sprint
    sprint = {"sprint": True, "windows": data.calibration.sequences, "top_k": settings.top_k,
              "checkpoint_every": settings.checkpoint_every, "refit_target": settings.refit_target,
              "reference": settings.reference}
    return lambda k: working_for(arch_config, config.dtype, **plain, **sprint,
                                 checkpoint_budget=sprint_checkpoint_budget(arch_config, config.dtype, gpu_bytes, k))


def resolve_gpus_per_actor(config: Any, *, inventory: GpuInventory | None = None,
                           model_config: dict | None = None) -> float:
    """``config.cluster.gpus_per_actor`` as a number of GPUs (see the module docstring).

    ``inventory`` replaces asking the cluster (:func:`gpu_inventory`); ``model_config`` replaces
    reading the model's ``config.json`` (``actors.models.read_model_config``).
    """
    cluster = config.cluster
    asked = cluster.gpus_per_actor
    if asked != "auto" and float(asked) < 1:
        return float(asked)
    from actors.models import read_model_config
    from actors.offload import check_fits
    from actors.sizing import replica_size

    if inventory is None:
        inventory = gpu_inventory(timeout_s=cluster.placement_timeout_s)
    if isinstance(cluster.gpu_memory_gb, (int, float)):
        inventory = GpuInventory(inventory.gpus_per_node, int(cluster.gpu_memory_gb * 1e9))
    if inventory.gpus_per_node < 1 or inventory.gpu_bytes is None:
        if asked == "auto":
            log.info("cluster.gpus_per_actor=auto: the cluster has no GPUs, so replicas run on CPUs")
            return 0.0
        return float(asked)  # placement will say that no node has the GPUs asked for
    model_config = model_config or read_model_config(config.model)
    working = working_memory_of(config, model_config, inventory.gpu_bytes)
    if asked != "auto":
        check_fits(model_config, config.dtype, int(asked), inventory.gpu_bytes, working)
        return float(asked)
    size = replica_size(model_config, config.dtype, inventory.gpu_bytes, working, max_gpus=inventory.gpus_per_node)
    log.info("cluster.gpus_per_actor=auto: %d GPU(s) per replica\n%s", size.gpus, size.describe())
    return float(size.gpus)


def gpu_inventory(timeout_s: float = 60.0) -> GpuInventory:
    """The GPUs replicas will get: the Ray cluster's (joined if ``RAY_ADDRESS`` is set), else this machine's."""
    import ray

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        from .session import connect

        connect()
        per_node = max((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0)
        if per_node < 1:
            return GpuInventory(0, None)
        probe = ray.remote(num_gpus=1, num_cpus=0, max_calls=1)(_gpu_total_memory)  # the worker exits after it
        return GpuInventory(per_node, int(ray.get(probe.remote(), timeout=timeout_s)))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s + 60)
    if out.returncode != 0:
        raise RuntimeError(f"could not ask this machine's GPUs for their memory ({out.stderr.strip()[-300:]}); "
                           f"set cluster.gpu_memory_gb to the memory of one GPU, e.g. cluster.gpu_memory_gb=80")
    count, total = json.loads(out.stdout.strip().splitlines()[-1])
    return GpuInventory(int(count), None if total is None else int(total))


def _gpu_total_memory() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)
