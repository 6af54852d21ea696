"""Connecting to Ray and placing evaluator replicas.

On a cluster (``ray job submit`` sets ``RAY_ADDRESS``) rayprune joins the running cluster. Alone it
starts a private local session sized for the campaign: explicit CPUs, no dashboard, a small object
store, token authentication, every socket on 127.0.0.1. It never stops a Ray it did not start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol

if TYPE_CHECKING:
    from actors.permutation import Permutation

log = logging.getLogger("rayprune")

#: The object store carries masks, token windows and, for a SPRINT step spread over the pool, each
#: shard's refit sums on their way to the driver and back to a solver: top_k x (w^2 + w H) float64 per
#: shard, 165 MB for SmolLM2 on 2 replicas, which a 200 MiB store spilled to disk (3 s a step of 10
#: here, bench/sprint_pool.py). 1 GiB of shared memory is reserved only as it fills.
LOCAL_OBJECT_STORE_BYTES = 1024 * 1024 * 1024


def connect(num_cpus: int | None = None, *, namespace: str = "rayprune") -> bool:
    """Join ``RAY_ADDRESS`` if set, else start a private local session. Returns True if we started it.

    The private session runs with token authentication and binds every socket to 127.0.0.1
    (:mod:`cluster.auth`); joining a cluster that refuses our token raises
    :class:`~cluster.auth.ClusterAuthError`, which says where the token goes.
    """
    import ray

    from .auth import check_cluster_access, loopback_only, private_session_token

    if ray.is_initialized():
        return False
    if address := os.environ.get("RAY_ADDRESS"):
        check_cluster_access(address)
        ray.init(namespace=namespace, log_to_driver=True)
        return False
    private_session_token()
    with loopback_only():
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
    the retries of the work it was doing (``max_task_retries=0``). ``gpus_per_actor`` is a number:
    ``auto`` is resolved before (:func:`cluster.replica_size.resolve_gpus_per_actor`)."""
    if isinstance(gpus_per_actor, str):
        raise ValueError(f"gpus_per_actor={gpus_per_actor!r} was not resolved to a number of GPUs; call "
                         f"cluster.replica_size.resolve_gpus_per_actor(config) before starting evaluators")
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

    options = replica_options(cpus_per_actor, gpus_per_actor)  # first: it refuses an unresolved "auto"
    groups = place_replicas(n, cpus_per_actor, gpus_per_actor, timeout_s=placement_timeout_s)
    threads = max(1, int(cpus_per_actor))
    cls = ray.remote(evaluator_cls or Evaluator)
    device_map = "auto" if gpus_per_actor > 1 else ("cuda" if gpus_per_actor else None)
    actors = [cls.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(g, placement_group_bundle_index=0))
              .remote(num_threads=threads, device_map=device_map, **evaluator_kwargs) for g in groups]
    return Replicas(actors, groups)


class PoolSpec(Protocol):
    """What :func:`evaluator_pool` reads of a campaign's ``cluster`` config."""

    actors: int | str
    cpus_per_actor: float
    gpus_per_actor: float
    placement_timeout_s: float


@dataclass(frozen=True)
class Pool:
    """Running evaluator replicas that all loaded the same weights (``model_fingerprint``), in the
    same ``dtype`` (the config's ``dtype`` as the replicas resolved it; None if they do not say),
    with the same channel order (``permutation``; None when the replicas are not reordered)."""

    actors: list
    model_fingerprint: str
    dtype: str | None = None
    permutation: Permutation | None = None


def channel_order(model: str, known: Permutation | None = None) -> Permutation:
    """The one channel order of a campaign (:func:`actors.permutation.permutation_for`), computed by
    one Ray task on a worker, never on the driver (which reads no weight) nor per replica."""
    import ray

    from actors.permutation import permutation_for

    return ray.get(ray.remote(permutation_for).options(num_cpus=1, name="rayprune-channel-order")
                   .remote(model, known))


@contextlib.contextmanager
def evaluator_pool(cluster: PoolSpec, *, evaluator_cls: type | None = None, permutation: Permutation | None = None,
                   **evaluator_kwargs: Any) -> Iterator[Pool]:
    """The one place a campaign's evaluators start and stop.

    Joins ``RAY_ADDRESS`` or starts a private session sized for ``cluster`` (:func:`connect`),
    obtains the channel order once (:func:`channel_order`: ``permutation``, a run's stored order, if
    it still belongs to the model's weights, else computed) and hands it to every replica, places
    ``cluster.actors`` replicas (``auto``: as many as the free resources hold), checks that every
    replica loaded the same weights, and on exit frees what it took: the actors and their placement
    groups on a shared Ray, the whole session if it started one.
    """
    import ray

    from .placement import PlacementError, free_replica_slots

    fixed = isinstance(cluster.actors, int)
    started = connect(num_cpus=max(1, math.ceil(cluster.actors * cluster.cpus_per_actor)) if fixed else os.cpu_count())
    actors = None
    try:
        n_actors = cluster.actors if fixed else free_replica_slots(cluster.cpus_per_actor, cluster.gpus_per_actor)
        if n_actors < 1:
            raise PlacementError(f"cluster.actors=auto found no free slot for a replica of "
                                 f"{cluster.cpus_per_actor} CPU / {cluster.gpus_per_actor} GPU; free resources "
                                 f"or lower cluster.cpus_per_actor / cluster.gpus_per_actor")
        if evaluator_kwargs.get("reorder", True):
            permutation = channel_order(evaluator_kwargs["model"], permutation)
            evaluator_kwargs["permutation"] = ray.put(permutation)  # one copy in the object store, not n
        else:
            permutation = None
        actors = start_evaluators(n_actors, cluster.cpus_per_actor, cluster.gpus_per_actor,
                                  placement_timeout_s=cluster.placement_timeout_s, evaluator_cls=evaluator_cls,
                                  **evaluator_kwargs)
        infos = ray.get([a.info.remote() for a in actors])
        fingerprint = infos[0]["model_fingerprint"]
        if any(i["model_fingerprint"] != fingerprint for i in infos):
            seen = sorted({f"{i['model_fingerprint']} ({i.get('dtype', '?')} on {i.get('device', '?')})" for i in infos})
            raise RuntimeError(f"evaluator replicas loaded different weights or dtypes ({'; '.join(seen)}); check "
                               f"the model path on every node, and set dtype explicitly (e.g. dtype=bfloat16) when "
                               f"dtype=auto resolves differently on different GPUs")
        log.info("%d evaluator(s) ready: %s", len(actors), ", ".join(i["worker"] for i in infos))
        yield Pool(list(actors), fingerprint, infos[0].get("dtype"), permutation)
    finally:
        if actors is not None and not started:  # a shared Ray outlives us: free what we took
            actors.shutdown()
        if started:
            ray.shutdown()
