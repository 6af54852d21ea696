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
    config = tmp_path / "c.yaml"  # 2048-token windows: the working memory takes 70B to 3 GPUs (test below)
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {target_ratio: 0.2}\n"
                      "data: {calibration: {length: 2048}, evaluation: {length: 2048}}\n")
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


# ---- the replica: k and its memory from accelerate's device map on the meta device -----------------
def plan_output(capsys, tmp_path, *args: str, length: int = 2048) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(f"name: p\nmodel: smollm2-135m\nsearch: {{target_ratio: 0.2}}\ndtype: bfloat16\n"
                      f"data: {{calibration: {{length: {length}}}, evaluation: {{length: {length}}}}}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-70b", "--gpus", "8", *args]) == 0
    return capsys.readouterr().out


def test_plan_prints_k_and_the_replica_memory_that_accelerate_gives_llama2_70b(capsys, tmp_path):
    """Llama-2-70B in bf16 on 80 GB GPUs, batch 4 x 2048: the figures of accelerate's own map."""
    from actors.sizing import MARGIN_BYTES, working_for
    from search_spaces.memory import human_bytes
    from tests.actors.test_sizing import accelerate_map, keep_back

    out = plan_output(capsys, tmp_path)
    w = working_for(REFERENCE_MODELS["llama2-70b"], "bfloat16", batch_size=4, tokens=2048)
    mapping, sizes = accelerate_map(REFERENCE_MODELS["llama2-70b"], 3, keep_back(w, 3, 80))
    assert set(mapping.values()) == {0, 1, 2}
    weights = [sum(sizes[n] for n, d in mapping.items() if d == i) for i in range(3)]
    layers = [sum(1 for n, d in mapping.items() if n.startswith("model.layers.") and d == i) for i in range(3)]
    assert "| llama2-70b | blockpruner | 8 | 3 | 2 |" in out
    assert "replica: 3 GPUs of 80 GB (74.5 GiB) in bfloat16" in out
    assert f"weights {human_bytes(sizes[''])} ({sizes['']:,} bytes); working memory {human_bytes(w.total)}" in out
    assert f"per replica {human_bytes(sizes[''] + w.total)} (weights + working memory)" in out
    per_gpu = ", ".join(f"GPU {i}: {human_bytes(weights[i])} weights ({layers[i]} layers) + "
                        f"{human_bytes(w.anywhere + layers[i] * w.per_layer)} working" for i in range(3))
    assert f"accelerate's device map: {per_gpu}" in out
    need = [weights[i] + w.anywhere + layers[i] * w.per_layer + MARGIN_BYTES for i in range(3)]
    assert ", ".join(human_bytes(int(n)) for n in need) + " of 74.5 GiB" in out
    assert "kept streams 20.1 GiB" in out  # SPEC §8: 160 x 128 MiB (and the final stream)


def test_plan_takes_the_gpu_memory_and_dtype_and_says_when_no_node_holds_the_replica(capsys, tmp_path):
    assert "replica: 2 GPUs of 80 GB" in plan_output(capsys, tmp_path, length=128)  # little working memory
    assert "replica: 1 GPU of 192 GB" in plan_output(capsys, tmp_path, "--gpu-memory-gb", "192")
    out = plan_output(capsys, tmp_path, "--gpus-per-node", "2", "dtype=float32")
    assert "replica: does not fit one node" in out and "in float32" in out and "does not fit 2 GPUs of 80 GB" in out
    assert "| llama2-70b | blockpruner | 8 | - | 0 |" in out


def test_the_scaling_model_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, cluster.plan; print(sorted({'torch', 'transformers', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
