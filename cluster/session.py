"""Connecting to Ray and placing evaluator replicas.

On a cluster (``ray job submit`` sets ``RAY_ADDRESS``) rayprune joins the running cluster. Alone it
starts a private local session sized for the campaign: explicit CPUs, no dashboard, a small object
store. It never stops a Ray it did not start.
"""

from __future__ import annotations

import os
from typing import Any

#: The object store only carries masks and token windows: 200 MiB is plenty.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024


def connect(num_cpus: int | None = None, *, namespace: str = "rayprune") -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a local session. Returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=namespace, log_to_driver=True)
        return False
    # A private session on loopback: Ray 2.60's token auth guards shared clusters, not this one.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        namespace=namespace,
        log_to_driver=True,
    )
    return True


def replica_options(cpus_per_actor: float, gpus_per_actor: float) -> dict[str, Any]:
    """Ray actor options for one evaluator replica. Ray restarts a dead replica; the driver owns
    the retries of the work it was doing (``max_task_retries=0``)."""
    return {
        "num_cpus": cpus_per_actor,
        "num_gpus": gpus_per_actor,
        "max_restarts": -1,
        "max_task_retries": 0,
    }


def start_evaluators(n: int, cpus_per_actor: float, gpus_per_actor: float, *, evaluator_cls: type | None = None,
                     **evaluator_kwargs: Any) -> list:
    """Start ``n`` evaluator actors; each pins its torch threads to its CPU share.

    ``evaluator_cls`` replaces :class:`actors.evaluator.Evaluator` (a subclass, e.g. one that injects
    faults in tests); it must be importable by the Ray workers.
    """
    import ray

    from actors.evaluator import Evaluator

    threads = max(1, int(cpus_per_actor))
    cls = ray.remote(evaluator_cls or Evaluator).options(**replica_options(cpus_per_actor, gpus_per_actor))
    device_map = "auto" if gpus_per_actor > 1 else ("cuda" if gpus_per_actor else None)
    return [cls.remote(num_threads=threads, device_map=device_map, **evaluator_kwargs) for _ in range(n)]
