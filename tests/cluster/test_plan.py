"""The scaling model: monotone where it must be, and consistent with the greedy search it models."""

from __future__ import annotations

import math

import pytest

from cluster.plan import REFERENCE_MODELS, Hardware, gpus_per_replica, plan_campaign
from orchestrator import cli
from search_spaces import Arch

LLAMA7, LLAMA70 = (Arch.from_hf_config(REFERENCE_MODELS[m]) for m in ("llama2-7b", "llama2-70b"))


@pytest.mark.parametrize("method", ["blockpruner", "multipruner"])
def test_engine_never_slower_and_more_gpus_never_slower(method):
    hw = Hardware()
    previous = math.inf
    for gpus in (1, 2, 8, 64):
        plan = plan_campaign(LLAMA7, "7b", method, 0.2, 65536, gpus, hw, mlp_group=688)
        assert plan.hours_engine <= plan.hours_naive
        assert plan.hours_engine <= previous
        previous = plan.hours_engine
    assert plan_campaign(LLAMA7, "7b", method, 0.2, 65536, 1, hw, mlp_group=688).hours_engine < \
        plan_campaign(LLAMA7, "7b", method, 0.2, 65536, 1, hw, mlp_group=688).hours_naive * 0.7


def test_memory_decides_gpus_per_replica():
    assert gpus_per_replica(LLAMA7, Hardware()) == 1
    assert gpus_per_replica(LLAMA70, Hardware()) == 3  # 138 GB of bf16 weights + headroom on 80 GB GPUs
    assert gpus_per_replica(LLAMA70, Hardware(gpu_memory_gb=192)) == 1
    assert not plan_campaign(LLAMA70, "70b", "blockpruner", 0.2, 65536, 1, Hardware()).feasible


def test_time_scales_with_tokens_and_counts_follow_the_greedy_search():
    hw = Hardware()
    a = plan_campaign(LLAMA7, "7b", "blockpruner", 0.2, 32768, 1, hw)
    b = plan_campaign(LLAMA7, "7b", "blockpruner", 0.2, 65536, 1, hw)
    assert b.hours_naive == pytest.approx(2 * a.hours_naive)
    # Step s of a greedy block search scores every block still present: 64, 63, ...
    assert a.evaluations == sum(64 - s for s in range(a.steps))


def test_calibrated_to_the_blockpruner_paper():
    """5.5 GPU-hours for Llama2-7B at 22% with ~64k calibration tokens (SPEC §2)."""
    plan = plan_campaign(LLAMA7, "7b", "blockpruner", 0.22, 65536, 1, Hardware())
    assert 4.0 < plan.hours_naive < 7.0


def test_plan_command_prints_a_row_per_gpu_count(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {target_ratio: 0.2}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-70b", "--gpus", "1", "8", "--tokens", "65536"]) == 0
    out = capsys.readouterr().out
    assert "| llama2-70b | blockpruner | 1 | 3 | 0 |" in out and "does not fit" in out
    assert "| llama2-70b | blockpruner | 8 | 3 | 2 |" in out


def test_a_speedup_target_is_planned_as_the_ratio_with_those_flops():
    from cluster.plan import _layer_flops_per_token, ratio_for_speedup
    from search_spaces import dense_params

    r = ratio_for_speedup(LLAMA7, 1.25)
    attn, mlp, head = _layer_flops_per_token(LLAMA7)
    dense_flops = LLAMA7.num_layers * (attn + mlp) + head
    assert dense_flops / (dense_flops - 2 * r * dense_params(LLAMA7)) == pytest.approx(1.25)
    assert ratio_for_speedup(LLAMA7, 1.0) == 0 and ratio_for_speedup(LLAMA7, 1.5) > r
    with pytest.raises(ValueError, match="target_speedup"):
        ratio_for_speedup(LLAMA7, 1000.0)


def test_plan_command_with_a_sprint_speedup_target(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {method: sprint, target_speedup: 1.25}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-7b", "--gpus", "1", "--tokens", "65536"]) == 0
    out = capsys.readouterr().out
    assert "| llama2-7b | blockpruner | 1 | 1 | 1 |" in out
    assert "target_speedup 1.25x is planned as parameter ratio 0.1" in out and "SPRINT" in out
