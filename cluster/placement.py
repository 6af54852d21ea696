"""Placing evaluator replicas: one placement group per replica, packed on one node.

A replica needs ``gpus_per_actor`` GPUs and ``cpus_per_actor`` CPUs of *one* node (a 70B model
spans k GPUs that must share a host for accelerate's ``device_map``). Each replica gets a
STRICT_PACK placement group; if the cluster cannot fit it within ``timeout_s`` the group is removed
and a ``PlacementError`` says what was asked, what the nodes have, and what to change.

On an autoscaling cluster the nodes may not exist yet. :class:`Placements` asks the autoscaler for
every replica's bundle (``ray.autoscaler.sdk.request_resources``), returns as soon as one replica is
placed, and hands out the others as their groups become ready (nodes booting), until ``timeout_s``:
a campaign starts with its first replica, never waits for the last one, and gives up only on the
replicas that never came.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("rayprune")

#: After the first replica is placed, how long the others that fit the cluster as it is get to be placed too.
GRACE_S = 2.0


class PlacementError(RuntimeError):
    """The cluster cannot hold the requested replicas."""


def replica_bundle(cpus_per_actor: float, gpus_per_actor: float) -> dict[str, float]:
    bundle = {"CPU": float(cpus_per_actor)}
    if gpus_per_actor:
        bundle["GPU"] = float(gpus_per_actor)
    return bundle


def _node_summary() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = [f"{n.get('NodeManagerAddress', '?')}: {n['Resources'].get('CPU', 0):g} CPU, "
             f"{n['Resources'].get('GPU', 0):g} GPU" for n in nodes]
    return "; ".join(parts) or "no live nodes"


def place_replicas(n: int, cpus_per_actor: float, gpus_per_actor: float, *, timeout_s: float = 60.0) -> list[Any]:
    """Reserve ``n`` single-node bundles; returns their placement groups (ready) or raises."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = replica_bundle(cpus_per_actor, gpus_per_actor)
    groups = [placement_group([bundle], strategy="STRICT_PACK", name=f"rayprune-replica-{i}") for i in range(n)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=n, timeout=timeout_s)
    if len(ready) < n:
        for g in groups:
            remove_placement_group(g)
        raise PlacementError(
            f"only {len(ready)} of {n} evaluator replicas ({bundle} each, on one node) could be placed within "
            f"{timeout_s:.0f} s; the cluster has {_node_summary()}. Lower cluster.actors, cluster.gpus_per_actor "
            f"or cluster.cpus_per_actor, use cluster.actors=auto, or add nodes."
        )
    return groups


def free_replica_slots(cpus_per_actor: float, gpus_per_actor: float) -> int:
    """``cluster.actors: auto``: replicas that fit the free resources, counted node by node."""
    import ray

    try:
        per_node = ray._private.state.available_resources_per_node()
    except AttributeError:  # a Ray without the helper: fall back to each node's total resources
        per_node = {}
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        free = per_node.get(node["NodeID"], node["Resources"])
        slots = int(free.get("CPU", 0) // cpus_per_actor) if cpus_per_actor else 10**6
        if gpus_per_actor:
            slots = min(slots, int(free.get("GPU", 0) // gpus_per_actor))
        total += slots
    return total


def request_capacity(bundles: list[dict[str, float]]) -> bool:
    """Ask the autoscaler (if the cluster has one) to make room for ``bundles``; False if it could
    not be asked. The request replaces any earlier one of this driver and stays until replaced."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as exc:  # no autoscaler API on this cluster: placement groups still wait for nodes
        log.debug("could not ask the autoscaler for %d bundles: %r", len(bundles), exc)
        return False
    return True


class Placements:
    """``n`` replica placement groups that become ready over time (see the module docstring)."""

    def __init__(self, n: int, cpus_per_actor: float, gpus_per_actor: float, *, timeout_s: float) -> None:
        from ray.util.placement_group import placement_group

        self.bundle = replica_bundle(cpus_per_actor, gpus_per_actor)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.requested = request_capacity([self.bundle] * n)
        self.groups = [placement_group([self.bundle], strategy="STRICT_PACK", name=f"rayprune-replica-{i}")
                       for i in range(n)]
        self._waiting = {g.ready(): g for g in self.groups}

    @classmethod
    def placed(cls, groups: list[Any]) -> Placements:
        """Groups that are already placed (:func:`place_replicas`): nothing asked, nothing waiting."""
        self = cls.__new__(cls)
        self.bundle, self.timeout_s, self.deadline, self.requested = {}, 0.0, 0.0, False
        self.groups, self._waiting = list(groups), {}
        return self

    @property
    def pending(self) -> int:
        """Replicas still waiting for room."""
        return len(self._waiting)

    def first(self) -> list[Any]:
        """Wait (up to the timeout) until at least one group is ready, then ``GRACE_S`` for the others
        that fit now (room that exists is granted in milliseconds; a booting node takes minutes); return
        every ready group. PlacementError, with every group removed, when none could be placed in time."""
        import ray

        refs = list(self._waiting)
        ray.wait(refs, num_returns=1, timeout=max(0.0, self.deadline - time.monotonic()))
        ray.wait(refs, num_returns=len(refs), timeout=min(GRACE_S, max(0.0, self.deadline - time.monotonic())))
        ready = self.poll(expire=False)
        if not ready:
            self.remove()
            raise PlacementError(
                f"no evaluator replica ({self.bundle}, on one node) could be placed within {self.timeout_s:.0f} s; the "
                f"cluster has {_node_summary()}. Lower cluster.gpus_per_actor or cluster.cpus_per_actor, add nodes, "
                f"or raise cluster.placement_timeout_s if the autoscaler needs longer to boot one.")
        return ready

    def poll(self, expire: bool = True) -> list[Any]:
        """Groups that became ready since the last call (without waiting). Past the deadline, the
        groups still waiting are removed (``expire``), with a warning: the campaign goes on without them."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self._waiting:
            return []
        ready, _ = ray.wait(list(self._waiting), num_returns=len(self._waiting), timeout=0)
        groups = [self._waiting.pop(ref) for ref in ready]
        if expire and self._waiting and time.monotonic() > self.deadline:
            log.warning("%d of %d evaluator replicas could not be placed within %.0f s (the cluster has %s); "
                        "going on with %d", len(self._waiting), len(self.groups), self.timeout_s, _node_summary(),
                        len(self.groups) - len(self._waiting))
            for group in self._waiting.values():
                remove_placement_group(group)
                self.groups.remove(group)
            self._waiting.clear()
            request_capacity([self.bundle] * len(self.groups))  # withdraw the request for the others
        return groups

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            remove_placement_group(group)
        self.groups, self._waiting = [], {}
        if self.requested:
            request_capacity([])  # nothing is needed any more
