"""``rayprune eval`` on the cluster: the model loads on a worker that has the GPUs, never on the driver.

A Ray task with ``num_gpus`` GPUs and ``num_cpus`` CPUs does what ``rayprune eval`` does locally
(:func:`~orchestrator.eval_model.load_target` and :func:`~orchestrator.eval_model.evaluate_model`)
and returns the JSON-ready figures; the driver reads no weight. On the worker the model goes to its
GPU (over several GPUs, accelerate's balanced map: a 70B export in bf16 over 2 x 80 GB). A run
directory or export must be readable there: on shared storage (a mounted path) or a URI, which the
worker pulls itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def evaluate_on_cluster(spec: str, *, dtype: str | None = None, num_gpus: float | None = None,
                        num_cpus: float = 1.0, **settings: Any) -> dict[str, Any]:
    """The figures of ``rayprune eval SPEC`` computed by one Ray task; ``num_gpus`` None: one GPU when
    the cluster has any, else none. ``settings``: :func:`evaluate_model`'s keywords."""
    import ray

    from cluster.session import connect

    from .storage import uri_scheme

    local = uri_scheme(spec) is None and Path(spec).expanduser().exists()  # a path here, not a preset or hub id
    if local:
        spec = str(Path(spec).expanduser().resolve())
    started = connect(num_cpus=max(1, int(num_cpus)))
    try:
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        task = ray.remote(evaluate_here).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
                                                 name="rayprune-eval")
        return ray.get(task.remote(spec, dtype, settings, int(num_cpus), local))
    finally:
        if started:
            ray.shutdown()


def evaluate_here(spec: str, dtype: str | None, settings: dict[str, Any], threads: int = 0,
                  path: bool = False) -> dict[str, Any]:
    """What the task runs on its worker: load, move to this worker's GPUs, evaluate. ``path``: ``spec``
    is a path on the driver's filesystem, which must be on this worker's too."""
    import torch

    from .eval_model import evaluate_model, load_target
    from .storage import local_run

    if threads:
        torch.set_num_threads(threads)
    if path and not Path(spec).exists():
        raise FileNotFoundError(f"{spec} is not on the worker {socket.gethostname()}; put it on shared storage "
                                f"(a mounted path or a URI such as s3://...) or evaluate on the driver (--on driver)")
    with local_run(spec) as path:  # a run directory behind a URI is pulled here, on the worker
        target = load_target(spec if path == Path(spec) else str(path), dtype=dtype)
    target.model = on_gpus(target.model)
    result = evaluate_model(target, **settings)
    return {**result, "worker": f"{socket.gethostname()}:{os.getpid()}",
            "device": str(target.model.get_output_embeddings().weight.device)}


def on_gpus(model: Any) -> Any:
    """``model`` on this process's GPUs: none (as it is), one, or spread over several (accelerate)."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return model
    if n == 1:
        return model.to("cuda")
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = getattr(model, "_no_split_modules", None) or []
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    return dispatch_model(model, infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split))
