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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

from .placement import Placements

if TYPE_CHECKING:
    from actors.permutation import Permutation

log = logging.getLogger("rayprune")

#: The object store carries masks, token windows and, for a SPRINT step spread over the pool, each
#: shard's refit sums on their way to the driver and back to a solver: top_k x (w^2 + w H) float64 per
#: shard, 165 MB for SmolLM2 on 2 replicas, which a 200 MiB store spilled to disk (3 s a step of 10
#: here, bench/sprint_pool.py). 1 GiB of shared memory is reserved only as it fills.
LOCAL_OBJECT_STORE_BYTES = 1024 * 1024 * 1024

#: A private session holds what it will ever hold: a replica not placed by then never will be.
PRIVATE_PLACEMENT_TIMEOUT_S = 60.0


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
    """The evaluator actors of a campaign; ``shutdown()`` frees them and their placement groups
    (and withdraws what was asked of the autoscaler)."""

    def __init__(self, actors: list, placements: Placements | None = None) -> None:
        super().__init__(actors)
        self.placements = placements

    @property
    def groups(self) -> list:
        return self.placements.groups if self.placements is not None else []

    def shutdown(self) -> None:
        import ray

        for actor in self:
            ray.kill(actor, no_restart=True)
        if self.placements is not None:
            self.placements.remove()
        self.clear()


def _replica_factory(cpus_per_actor: float, gpus_per_actor: float, evaluator_cls: type | None,
                     evaluator_kwargs: Mapping[str, Any]) -> Callable[[Any], Any]:
    """``start(group)``: one evaluator actor in a ready placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from actors.evaluator import Evaluator

    options = replica_options(cpus_per_actor, gpus_per_actor)  # first: it refuses an unresolved "auto"
    threads = max(1, int(cpus_per_actor))
    cls = ray.remote(evaluator_cls or Evaluator)
    device_map = "auto" if gpus_per_actor > 1 else ("cuda" if gpus_per_actor else None)

    def start(group: Any) -> Any:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        return cls.options(**options, scheduling_strategy=strategy).remote(num_threads=threads, device_map=device_map,
                                                                           **evaluator_kwargs)

    return start


def start_evaluators(n: int, cpus_per_actor: float, gpus_per_actor: float, *, evaluator_cls: type | None = None,
                     placement_timeout_s: float = 60.0, **evaluator_kwargs: Any) -> Replicas:
    """Start ``n`` evaluator actors, each in its own single-node placement group, all placed before
    it returns (benchmarks; a campaign lets replicas join as they come: :func:`evaluator_pool`).

    Each pins its torch threads to its CPU share; a replica with k > 1 GPUs spreads the model over
    them with accelerate's ``device_map="auto"``. ``evaluator_cls`` replaces
    :class:`actors.evaluator.Evaluator` (a subclass, e.g. one that injects faults in tests); it
    must be importable by the Ray workers.
    """
    from .placement import place_replicas

    start = _replica_factory(cpus_per_actor, gpus_per_actor, evaluator_cls, evaluator_kwargs)
    groups = place_replicas(n, cpus_per_actor, gpus_per_actor, timeout_s=placement_timeout_s)
    return Replicas([start(g) for g in groups], Placements.placed(groups))


class Joiner:
    """Replicas that join a running campaign: started as their placement groups become ready (an
    autoscaler booting nodes), handed to the dispatcher (``poll``) once loaded with the pool's
    weights. A replica that loaded other weights is stopped, with an error in the log."""

    def __init__(self, placements: Placements, start: Callable[[Any], Any], fingerprint: str,
                 replicas: Replicas) -> None:
        self.placements, self.start, self.fingerprint, self.replicas = placements, start, fingerprint, replicas
        self._loading: dict[Any, Any] = {}  # info() ref -> actor

    @property
    def pending(self) -> bool:
        """Whether replicas may still join."""
        return bool(self.placements.pending or self._loading)

    def wait_all(self, poll_s: float = 1.0) -> list:
        """Every replica still to come, once each has joined or was given up (for a pool that must be
        whole before it starts, such as ``rayprune tune``'s shared one)."""
        joined = []
        while self.pending:
            joined += self.poll()
            if self.pending:
                time.sleep(poll_s)
        return joined

    def poll(self) -> list:
        """Replicas ready to work since the last call (does not wait)."""
        import ray
        from ray.exceptions import RayActorError

        for group in self.placements.poll():
            actor = self.start(group)
            self.replicas.append(actor)
            self._loading[actor.info.remote()] = actor
        if not self._loading:
            return []
        ready, _ = ray.wait(list(self._loading), num_returns=len(self._loading), timeout=0)
        joined = []
        for ref in ready:
            actor = self._loading.pop(ref)
            try:
                info = ray.get(ref)
            except RayActorError as exc:
                log.error("a replica that was joining the pool died while loading: %s", exc)
                continue
            if info["model_fingerprint"] != self.fingerprint:
                log.error("a joining replica loaded %s, not the pool's %s: stopped (check the model path on %s)",
                          info["model_fingerprint"], self.fingerprint, info["worker"])
                ray.kill(actor, no_restart=True)
                continue
            log.info("evaluator %s joined the pool", info["worker"])
            joined.append(actor)
        return joined


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
    joiner: Joiner | None = None  # replicas still being placed join through it (Dispatcher(joiner=...))


def channel_order(model: str, known: Permutation | None = None, kv_weight: str = "n_rep") -> Permutation:
    """The one channel order of a campaign (:func:`actors.permutation.permutation_for`, GQA's k/v
    rows weighted by ``kv_weight``), computed by one Ray task on a worker, never on the driver
    (which reads no weight) nor per replica."""
    import ray

    from actors.permutation import permutation_for

    return ray.get(ray.remote(permutation_for).options(num_cpus=1, name="rayprune-channel-order")
                   .remote(model, known, kv_weight))


@contextlib.contextmanager
def evaluator_pool(cluster: PoolSpec, *, evaluator_cls: type | None = None, permutation: Permutation | None = None,
                   kv_weight: str = "n_rep", **evaluator_kwargs: Any) -> Iterator[Pool]:
    """The one place a campaign's evaluators start and stop.

    Joins ``RAY_ADDRESS`` or starts a private session sized for ``cluster`` (:func:`connect`),
    obtains the channel order once (:func:`channel_order`: ``permutation``, a run's stored order, if
    it still belongs to the model's weights and ``kv_weight``, else computed) and hands it to every replica, places
    ``cluster.actors`` replicas (``auto``: as many as the free resources hold now, at least one),
    asking the autoscaler for their bundles (:class:`~cluster.placement.Placements`). It yields as
    soon as one replica is placed and loaded; the others join the running campaign through
    ``pool.joiner`` as the cluster makes room, until ``cluster.placement_timeout_s``. It checks that
    every replica loaded the same weights, and on exit frees what it took: the actors, their
    placement groups and the autoscaler request on a shared Ray, the whole session if it started one.
    """
    import ray

    from .placement import Placements, free_replica_slots

    fixed = isinstance(cluster.actors, int)
    started = connect(num_cpus=max(1, math.ceil(cluster.actors * cluster.cpus_per_actor)) if fixed else os.cpu_count())
    actors = None
    try:
        n_actors = cluster.actors if fixed else max(1, free_replica_slots(cluster.cpus_per_actor,
                                                                          cluster.gpus_per_actor))
        if evaluator_kwargs.get("reorder", True):
            permutation = channel_order(evaluator_kwargs["model"], permutation, kv_weight)
            evaluator_kwargs["permutation"] = ray.put(permutation)  # one copy in the object store, not n
        else:
            permutation = None
        # A private session has every resource it will ever have: no autoscaler to wait for.
        timeout_s = min(cluster.placement_timeout_s, PRIVATE_PLACEMENT_TIMEOUT_S) if started else cluster.placement_timeout_s
        placements = Placements(n_actors, cluster.cpus_per_actor, cluster.gpus_per_actor, timeout_s=timeout_s)
        actors = Replicas([], placements)
        start = _replica_factory(cluster.cpus_per_actor, cluster.gpus_per_actor, evaluator_cls, evaluator_kwargs)
        actors.extend(start(group) for group in placements.first())
        infos = ray.get([a.info.remote() for a in actors])
        fingerprint = infos[0]["model_fingerprint"]
        if any(i["model_fingerprint"] != fingerprint for i in infos):
            seen = sorted({f"{i['model_fingerprint']} ({i.get('dtype', '?')} on {i.get('device', '?')})" for i in infos})
            raise RuntimeError(f"evaluator replicas loaded different weights or dtypes ({'; '.join(seen)}); check "
                               f"the model path on every node, and set dtype explicitly (e.g. dtype=bfloat16) when "
                               f"dtype=auto resolves differently on different GPUs")
        joiner = Joiner(placements, start, fingerprint, actors)
        log.info("%d evaluator(s) ready: %s%s", len(actors), ", ".join(i["worker"] for i in infos),
                 f"; {placements.pending} more join as the cluster makes room" if placements.pending else "")
        yield Pool(list(actors), fingerprint, infos[0].get("dtype"), permutation, joiner)
    finally:
        if actors is not None and not started:  # a shared Ray outlives us: free what we took
            actors.shutdown()
        if started:
            ray.shutdown()
