"""``cluster.gpus_per_actor: auto`` resolved before the pool starts, and fixed counts checked."""

from __future__ import annotations

import pytest

from actors.sizing import ReplicaTooLarge
from cluster import replica_size
from cluster.replica_size import GpuInventory, gpu_inventory, resolve_gpus_per_actor
from orchestrator.config import ClusterConfig, Config, DataConfig, SearchConfig, SprintConfig, WindowsConfig
from tests.actors.test_sizing import LLAMA2_7B, LLAMA2_70B

NODE_8X80 = GpuInventory(8, 80 * 10**9)


def campaign(gpus, *, length=2048, memory="auto", method="blockpruner", sequences=8) -> Config:
    return Config(name="c", model="llama-2-70b", dtype="bfloat16",
                  data=DataConfig(calibration=WindowsConfig(sequences=sequences, length=length),
                                  evaluation=WindowsConfig(sequences=16, length=256)),
                  search=SearchConfig(method=method, target_ratio=0.2, batch_size=4, sprint=SprintConfig(top_k=5)),
                  cluster=ClusterConfig(gpus_per_actor=gpus, gpu_memory_gb=memory))


def test_cpu_and_gpu_shares_are_taken_as_given_without_asking_anything(monkeypatch):
    monkeypatch.setattr(replica_size, "gpu_inventory", lambda **_: pytest.fail("asked the cluster"))
    assert resolve_gpus_per_actor(campaign(0)) == 0.0
    assert resolve_gpus_per_actor(campaign(0.5)) == 0.5


def test_auto_picks_k_from_memory():
    assert resolve_gpus_per_actor(campaign("auto"), inventory=NODE_8X80, model_config=LLAMA2_70B) == 3
    assert resolve_gpus_per_actor(campaign("auto"), inventory=NODE_8X80, model_config=LLAMA2_7B) == 1
    # Short windows keep little working memory: the weights decide (2 GPUs of 80 GB hold 128.5 GiB).
    assert resolve_gpus_per_actor(campaign("auto", length=128), inventory=NODE_8X80, model_config=LLAMA2_70B) == 2
    # A configured GPU memory replaces the cluster's.
    assert resolve_gpus_per_actor(campaign("auto", memory=192.0), inventory=NODE_8X80, model_config=LLAMA2_70B) == 1


def test_auto_without_gpus_means_cpu_replicas():
    assert resolve_gpus_per_actor(campaign("auto"), inventory=GpuInventory(0, None), model_config=LLAMA2_70B) == 0


def test_a_node_too_small_for_the_replica_is_refused_before_the_campaign():
    with pytest.raises(ReplicaTooLarge, match="does not fit 2 GPUs"):
        resolve_gpus_per_actor(campaign("auto"), inventory=GpuInventory(2, 80 * 10**9), model_config=LLAMA2_70B)


def test_a_fixed_count_that_would_offload_is_refused_before_the_campaign():
    assert resolve_gpus_per_actor(campaign(4), inventory=NODE_8X80, model_config=LLAMA2_70B) == 4
    with pytest.raises(ReplicaTooLarge, match=r"a replica on 2 GPUs of 80 GB would offload .* needs 3 GPUs of 80 GB"):
        resolve_gpus_per_actor(campaign(2), inventory=NODE_8X80, model_config=LLAMA2_70B)


def test_sprint_counts_the_checkpoints_that_stay_on_the_device_and_its_refits():
    from actors.memory import DEFAULT_FRACTION
    from actors.sizing import weights_bytes
    from cluster.plan import size_replica

    sprint = size_replica(LLAMA2_7B, campaign("auto", method="sprint", sequences=256), 80)
    plain = size_replica(LLAMA2_7B, campaign("auto"), 80)
    assert sprint.gpus == plain.gpus == 1 and sprint.replica_bytes > plain.replica_bytes
    # 256 windows x 4 checkpoints x 3 states would be 24 GiB: beyond the budget they move to host memory.
    budget = int(DEFAULT_FRACTION * (80 * 10**9 - weights_bytes(LLAMA2_7B, "bfloat16")))
    assert sprint.working.sprint.checkpoints == budget < 3 * 4 * 256 * 2048 * 4096 * 2
    assert sprint.working.sprint.refits == 5 * (11008**2 + 11008 * 4096) * 8 + 4 * 11008**2 * 8
    # Llama-2-70B with SPRINT's 128 x 2048 tokens: the refits' float64 sums (5 x 8.6 GB) exceed the budget of
    # 3 GPUs, so the actor keeps them in host memory (actors/sprint.py): they take nothing on the GPUs, and 3
    # GPUs hold it, with the step's walk recording its 4 checkpoints (4 GiB each) on the device.
    big = size_replica(LLAMA2_70B, campaign("auto", method="sprint", sequences=128), 80)
    assert big.gpus == 3 and big.working.sprint.refits == 0
    assert big.working.sprint.step_streams == 4 * 128 * 2048 * 8192 * 2
    assert resolve_gpus_per_actor(campaign("auto", method="sprint", sequences=128), inventory=NODE_8X80,
                                  model_config=LLAMA2_70B) == 3


def test_sprint_working_memory_follows_refit_target_and_reference():
    """Short windows (8 x 256 tokens of Llama-2-7B: 16 MiB a stream of all of them) keep every store, so
    the settings show: the dense model's streams in the memo, a second branch stream per refit."""
    import dataclasses

    from actors.sizing import sprint_checkpoint_budget
    from actors.sprint import STORE_BYTES
    from cluster.replica_size import working_memory_of
    from search_spaces import Arch
    from search_spaces.memory import sprint_memory

    base = campaign("auto", method="sprint", length=128)
    figures = {}
    for target in ("local", "dense"):
        for reference in ("window", "current"):
            settings = SprintConfig(top_k=5, refit_target=target, reference=reference)
            config = dataclasses.replace(base, search=dataclasses.replace(base.search, sprint=settings))
            figures[target, reference] = working_memory_of(config, LLAMA2_7B, 80 * 10**9)(1).sprint
            budget = sprint_checkpoint_budget(LLAMA2_7B, "bfloat16", 80 * 10**9, 1)
            assert figures[target, reference] == sprint_memory(
                Arch.from_hf_config(LLAMA2_7B), windows=8, tokens=256, element_bytes=2, top_k=5,
                store_bytes=STORE_BYTES, checkpoint_budget=budget, refit_target=target, reference=reference)
    stream = 8 * 256 * 4096 * 2  # the dense state: 65 every-block streams in place of 4 checkpoints
    assert figures["dense", "window"].checkpoints - figures["local", "window"].checkpoints == (65 - 4) * stream
    assert figures["local", "window"].step_streams - figures["local", "current"].step_streams == 5 * stream


def test_the_ray_cluster_of_the_tests_has_no_gpus(ray_session):
    assert gpu_inventory() == GpuInventory(0, None)
    assert resolve_gpus_per_actor(campaign("auto"), model_config=LLAMA2_70B) == 0


def test_this_machine_is_asked_in_a_subprocess_without_ray(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    inventory = gpu_inventory()
    import torch

    assert inventory.gpus_per_node == torch.cuda.device_count()
    assert (inventory.gpu_bytes is None) == (inventory.gpus_per_node == 0)
