"""Replica placement on a real (local) Ray: clear errors when the cluster cannot fit a replica."""

from __future__ import annotations

import time

import pytest

from cluster.placement import PlacementError, free_replica_slots, place_replicas

pytestmark = pytest.mark.ray


def test_a_replica_that_cannot_fit_fails_fast_and_says_why(ray_session):
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as info:
        place_replicas(1, 1, 2, timeout_s=2)  # two GPUs on a CPU-only machine
    message = str(info.value)
    assert "0 of 1 evaluator replicas" in message and "'GPU': 2.0" in message and "0 GPU" in message
    assert "cluster.gpus_per_actor" in message
    assert time.monotonic() - t0 < 30
    assert ray_session.util.placement_group_table() == {} or all(
        g["state"] == "REMOVED" for g in ray_session.util.placement_group_table().values())


def test_auto_counts_free_slots_and_placed_groups_take_them(ray_session):
    from ray.util.placement_group import remove_placement_group

    assert free_replica_slots(1, 0) == 2
    assert free_replica_slots(1, 1) == 0
    groups = place_replicas(2, 1, 0, timeout_s=10)
    try:
        time.sleep(1)  # resource views refresh asynchronously
        assert free_replica_slots(1, 0) == 0
    finally:
        for g in groups:
            remove_placement_group(g)
