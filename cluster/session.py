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


class Replicas(list):
    """The evaluator actors of a campaign; ``shutdown()`` frees them and their placement groups."""

    def __init__(self, actors: list, groups: list) -> None:
        super().__init__(actors)
        self.groups = groups

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self:
            ray.kill(actor, no_restart=True)
        for group in self.groups:
            remove_placement_group(group)
        self.clear()
        self.groups = []


def start_evaluators(n: int, cpus_per_actor: float, gpus_per_actor: float, *, evaluator_cls: type | None = None,
                     placement_timeout_s: float = 60.0, **evaluator_kwargs: Any) -> Replicas:
    """Start ``n`` evaluator actors, each in its own single-node placement group.

    Each pins its torch threads to its CPU share; a replica with k > 1 GPUs spreads the model over
    them with accelerate's ``device_map="auto"``. ``evaluator_cls`` replaces
    :class:`actors.evaluator.Evaluator` (a subclass, e.g. one that injects faults in tests); it
    must be importable by the Ray workers.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.evaluator import Evaluator

    from .placement import place_replicas

    groups = place_replicas(n, cpus_per_actor, gpus_per_actor, timeout_s=placement_timeout_s)
    threads = max(1, int(cpus_per_actor))
    cls = ray.remote(evaluator_cls or Evaluator)
    options = replica_options(cpus_per_actor, gpus_per_actor)
    device_map = "auto" if gpus_per_actor > 1 else ("cuda" if gpus_per_actor else None)
    actors = [cls.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=0))
              .remote(num_threads=threads, device_map=device_map, **evaluator_kwargs) for g in groups]
    return Replicas(actors, groups)
