"""Placing evaluator replicas: one placement group per replica, packed on one node.

A replica needs ``gpus_per_actor`` GPUs and ``cpus_per_actor`` CPUs of *one* node (a 70B model
spans k GPUs that must share a host for accelerate's ``device_map``). Each replica gets a
STRICT_PACK placement group; if the cluster cannot fit it within ``timeout_s`` the group is removed
and a ``PlacementError`` says what was asked, what the nodes have, and what to change.
"""

from __future__ import annotations

from typing import Any


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
