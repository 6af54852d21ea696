"""The scaling model: monotone where it must be, and consistent with the greedy search it models."""

from __future__ import annotations

import math
import re

import pytest

from cluster.plan import REFERENCE_MODELS, Hardware, _layer_flops_per_token, gpus_per_replica, plan_campaign
from orchestrator import cli
from search_spaces import Arch

LLAMA7, LLAMA70 = (Arch.from_hf_config(REFERENCE_MODELS[m]) for m in ("llama2-7b", "llama2-70b"))


@pytest.mark.parametrize("method", ["blockpruner", "multipruner"])
def test_engine_never_slower_and_more_gpus_never_slower(method):
    """With window shards first. (The scorer's tiling, 2 mask chunks per replica, reruns a prefix per
    chunk: at 64 GPUs the plan finds it slower than the naive loop on width steps.)"""
    hw = Hardware(tiling="shards")
    previous = math.inf
    for gpus in (1, 2, 8, 64):
        plan = plan_campaign(LLAMA7, "7b", method, 0.2, 65536, gpus, hw, mlp_group=1024)
        assert plan.hours_engine <= plan.hours_naive
        assert plan.hours_engine <= previous
        previous = plan.hours_engine
    assert plan_campaign(LLAMA7, "7b", method, 0.2, 65536, 1, hw, mlp_group=1024).hours_engine < \
        plan_campaign(LLAMA7, "7b", method, 0.2, 65536, 1, hw, mlp_group=1024).hours_naive * 0.7


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
    """5.5 GPU-hours and about 1,000 evaluations for Llama2-7B at 22% with ~64k calibration tokens
    (SPEC §2): the middle block mix gives 999 evaluations, and 35 TFLOPS about 6 hours."""
    plan = plan_campaign(LLAMA7, "7b", "blockpruner", 0.22, 65536, 1, Hardware())
    assert 4.0 < plan.hours_naive < 7.0
    assert 950 <= plan.evaluations <= 1050


def test_plan_command_prints_a_row_per_gpu_count(capsys, tmp_path):
    config = tmp_path / "c.yaml"  # 2048-token windows: the working memory takes 70B to 3 GPUs (test below)
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {target_ratio: 0.2}\n"
                      "data: {calibration: {length: 2048}, evaluation: {length: 2048}}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-70b", "--gpus", "1", "8", "--tokens", "65536"]) == 0
    out = capsys.readouterr().out
    assert "| llama2-70b | blockpruner | 1 | 3 | 0 |" in out and "does not fit" in out
    assert "| llama2-70b | blockpruner | 8 | 3 | 2 |" in out


def test_a_speedup_target_is_planned_as_the_ratio_with_those_flops():
    """SPRINT's arithmetic (no fixed part) by default; the LM head as a fixed part with latency_fixed."""
    from cluster.plan import ratio_for_speedup
    from search_spaces import dense_params

    attn, mlp, head = _layer_flops_per_token(LLAMA7)
    blocks = LLAMA7.num_layers * (attn + mlp)
    sprint, fixed = ratio_for_speedup(LLAMA7, 1.25), ratio_for_speedup(LLAMA7, 1.25, fixed=True)
    removed = 2 * dense_params(LLAMA7)  # FLOPs per token of each removed ratio point
    assert blocks / (blocks - sprint * removed) == pytest.approx(1.25)
    assert (blocks + head) / (blocks + head - fixed * removed) == pytest.approx(1.25)
    assert fixed > sprint  # with a part no removal touches, the same speedup takes more blocks
    assert ratio_for_speedup(LLAMA7, 1.0) == 0 and ratio_for_speedup(LLAMA7, 1.5) > sprint
    assert ratio_for_speedup(LLAMA7, 1000.0) < 1  # without a fixed part any finite speedup is reachable
    with pytest.raises(ValueError, match=r"1x to 50\.\dx with its fixed part: search.sprint.latency_fixed"):
        ratio_for_speedup(LLAMA7, 1000.0, fixed=True)
    for bad in (0.9, math.inf, math.nan):
        with pytest.raises(ValueError, match="set search.target_speedup inside that range"):
            ratio_for_speedup(LLAMA7, bad)


@pytest.mark.parametrize("fixed", [False, True])
def test_a_speedup_target_on_a_latency_table_is_the_ratio_sprints_speedup_reaches(fixed):
    """A given latency table (seconds of one forward): the planned ratio is that of a mask removing the
    same share of attention and MLP blocks, and ``search_spaces.latency.speedup`` of that mask, with
    the costs a campaign estimates with (``blocks_only()`` unless latency_fixed), is the target."""
    from cluster.plan import ratio_for_speedup
    from search_spaces import Mask, dense_params, param_count
    from search_spaces.latency import BlockCosts, speedup

    table = BlockCosts(fixed=2.0, attn=0.3, mlp=0.5)
    costs = table if fixed else table.blocks_only()
    layers = range(0, LLAMA7.num_layers, 4)  # 8 of 32 attention and MLP blocks: a quarter of each
    mask = Mask(attn_removed=set(layers), mlp_removed=set(layers))
    target = speedup(mask, LLAMA7, costs)
    assert target == pytest.approx(4 / 3 if not fixed else (32 * 0.8 + 2.0) / (24 * 0.8 + 2.0))
    ratio = ratio_for_speedup(LLAMA7, target, fixed=fixed, costs=table)
    assert ratio == pytest.approx(1 - param_count(mask, LLAMA7) / dense_params(LLAMA7), rel=1e-9)


def test_the_plan_follows_latency_fixed():
    """SmolLM2-135M's shape: its LM head is a fifth of a forward's FLOPs, so the two arithmetics differ."""
    from cluster.plan import plan_search, ratio_for_speedup
    from orchestrator.config import SearchConfig, SprintConfig

    smol = Arch.from_hf_config({"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
                                "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                                "vocab_size": 49152, "tie_word_embeddings": True})
    plans = {}
    for fixed in (False, True):
        search = SearchConfig(method="sprint", target_speedup=1.25, sprint=SprintConfig(latency_fixed=fixed))
        [plan], notes = plan_search(smol, "smol", search, 65536, [1], Hardware())
        ratio = ratio_for_speedup(smol, 1.25, fixed=fixed)
        assert f"planned as parameter ratio {ratio:.3f}" in notes[0]
        assert ("latency_fixed" in notes[0]) == fixed
        plans[fixed] = plan
    assert plans[True].steps > plans[False].steps  # SPRINT's arithmetic removes fewer blocks


def test_plan_command_with_a_sprint_speedup_target(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {method: sprint, target_speedup: 1.25}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-7b", "--gpus", "1", "--tokens", "65536"]) == 0
    out = capsys.readouterr().out
    assert "| llama2-7b | sprint | 1 | 1 | 1 |" in out
    assert "target_speedup 1.25x is planned as parameter ratio 0.1" in out and "SPRINT: local sensitivities" in out


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


# ---- issue #12: an honest plan -----------------------------------------------------------------------
def test_replicas_fill_nodes_and_never_span_two():
    from cluster.plan import replicas_on_nodes

    assert replicas_on_nodes(64, 3, 8) == 16  # 8 nodes x floor(8 / 3), not 64 // 3 = 21
    assert replicas_on_nodes(12, 3, 8) == 3  # one full node (2) and a node of 4 GPUs (1)
    assert replicas_on_nodes(8, 1, 8) == 8 and replicas_on_nodes(2, 3, 8) == 0
    plan = plan_campaign(LLAMA70, "70b", "blockpruner", 0.22, 65536, 64, Hardware(), replica_gpus=3)
    assert plan.replicas == 16
    too_big = plan_campaign(LLAMA70, "70b", "blockpruner", 0.22, 65536, 64, Hardware(gpus_per_node=4),
                            replica_gpus=5)
    assert not too_big.feasible and "does not fit a node of 4 GPUs" in too_big.note


def test_the_block_mix_of_llama2_70b_is_a_possible_range():
    """Issue #12's figures at 22%: attention first takes 80 attention and 5 MLP blocks, 85 steps and
    10,030 evaluations; MLPs first 22 steps; never more attention blocks than layers."""
    plan = plan_campaign(LLAMA70, "70b", "blockpruner", 0.22, 65536, 64, Hardware(), replica_gpus=3)
    most, middle, fewest = plan.paths["most"], plan.paths["middle"], plan.paths["fewest"]
    assert (most.attn_removed, most.mlp_removed, most.steps, most.evaluations) == (80, 5, 85, 10030)
    assert (fewest.attn_removed, fewest.mlp_removed, fewest.steps) == (0, 22, 22)
    assert fewest.evaluations == sum(160 - s for s in range(22))
    assert fewest.steps < middle.steps < most.steps
    assert fewest.engine_s < middle.engine_s < most.engine_s
    for ratio in (0.1, 0.22, 0.5, 0.7):
        for rule, path in plan_campaign(LLAMA70, "70b", "blockpruner", ratio, 65536, 64, Hardware(),
                                        replica_gpus=3).paths.items():
            assert path.attn_removed <= 80 and path.mlp_removed <= 80, (ratio, rule)
            removed = path.attn_removed * 151003136 + path.mlp_removed * 704651264
            assert removed >= ratio * 68976648192  # the path reaches the target


def test_the_plan_prints_the_range_and_no_impossible_count(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("name: p\nmodel: smollm2-135m\nsearch: {target_ratio: 0.22}\ndtype: bfloat16\n"
                      "data: {calibration: {sequences: 32, length: 2048}, evaluation: {sequences: 64, length: 2048}}\n")
    assert cli.main(["plan", str(config), "--as-model", "llama2-70b", "--gpus", "8", "64", "--reloads", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| llama2-70b | blockpruner | 64 |"))
    assert row.startswith("| llama2-70b | blockpruner | 64 | 3 | 16 | 62 (22-85) |")
    assert "to 80 + 5)" in row and "10,030)" in row and "22-101" not in out
    for phrase in ("calibration 65,536 tokens", "held-out 131,072", "bfloat16: 35 effective TFLOPS",
                   "weights read at 1 GB/s", "2 restart(s) expected", "8 GPUs per node"):
        assert phrase in out


def _old_plan_step(arch, tokens, replicas, tflops=35.0):
    """The plan before issue #12 for a first step: suffixes divided evenly, half a prefix per replica."""
    attn, mlp, head = _layer_flops_per_token(arch)
    block = [attn if i % 2 == 0 else mlp for i in range(arch.num_blocks)]
    base, starts = sum(block), range(arch.num_blocks)
    mean_suffix = sum(sum(block[p:]) for p in starts) / len(starts)
    return (base / 2 + math.ceil(len(starts) / replicas) * (mean_suffix + head)) * tokens / (tflops * 1e12)


@pytest.mark.parametrize("arch,replicas,old,dispatched", [(LLAMA7, 16, 254, 525), (LLAMA70, 21, 4688, 8087)])
def test_the_old_plan_was_optimistic_and_window_shards_approach_the_bound(arch, replicas, old, dispatched):
    """Step 1 at 262,144 tokens (128 x 2048): chunks only, sent in order as the dispatcher did, take
    issue #12's simulated 525 s (7B, 16 replicas) and 8,087 s (70B, 21), against the old plan's 254 s
    and 4,688 s; tiles over window shards come within the windows' granularity of the balanced bound."""
    from cluster.plan_dispatch import simulate_step, step_candidates

    candidates = step_candidates(arch, "blocks", 0, 0)
    assert _old_plan_step(arch, 262144, replicas) == pytest.approx(old, abs=1)
    chunks = simulate_step(candidates, 262144, 2048, replicas, 35e12, policy="chunks", straggler=0, tile_overhead_s=0)
    assert chunks.seconds == pytest.approx(dispatched, abs=1)
    assert chunks.tiles == 2 * replicas
    tiles = simulate_step(candidates, 262144, 2048, replicas, 35e12, policy="shards", straggler=0, tile_overhead_s=0)
    # the scorer cuts shards only when candidates are fewer than 2 per replica: here it sends chunks only
    scorer = simulate_step(candidates, 262144, 2048, replicas, 35e12, straggler=0, tile_overhead_s=0)
    assert scorer.seconds == pytest.approx(chunks.seconds)
    granularity = math.ceil(128 / replicas) / (128 / replicas)  # whole windows per replica
    assert tiles.bound <= tiles.seconds <= tiles.bound * granularity * 1.0001
    assert tiles.seconds < 0.65 * chunks.seconds
    if arch is LLAMA7:  # 128 windows on 16 replicas: the bound exactly
        assert tiles.seconds == pytest.approx(tiles.bound)


def _tile_flops_by_hand(blocks, head, chunk):
    """The engine's rule written out: the base up to the chunk's last start, then each suffix."""
    last = max(chunk)
    work = sum(blocks[:last])
    for p in chunk:
        work += sum(blocks[p + 1:]) + head
    return work


def test_simulated_tiles_follow_the_engine_and_list_scheduling_matches_a_brute_force_reference():
    import itertools
    import random

    from cluster.plan_dispatch import Candidate, block_candidates, list_schedule, simulate_step

    rng = random.Random(0)
    blocks = [rng.uniform(1, 5) for _ in range(12)]
    candidates = block_candidates(list(enumerate(blocks)), 3.0, 12)
    # one chunk per candidate, one shard: each tile is one candidate with its own prefix
    for c, p in zip(candidates, range(12)):
        assert c.prefix + c.suffix == pytest.approx(_tile_flops_by_hand(blocks, 3.0, [p]))
    step = simulate_step(candidates, 1, 1, 6, 1.0, policy="chunks", longest_first=True, straggler=0,
                         tile_overhead_s=0)
    assert step.tiles == 12
    assert step.seconds == pytest.approx(list_schedule([_tile_flops_by_hand(blocks, 3.0, [p]) for p in range(12)], 6))

    def brute_list(durations, replicas):  # the dispatcher's rule, step by step: next tile to the first free
        finish = [0.0] * replicas
        for d in sorted(durations, reverse=True):
            i = min(range(replicas), key=lambda r: (finish[r], r))
            finish[i] += d
        return max(finish)

    for _ in range(30):
        durations = [rng.uniform(0.1, 10) for _ in range(rng.randint(1, 8))]
        replicas = rng.randint(1, 3)
        lpt = list_schedule(durations, replicas)
        assert lpt == pytest.approx(brute_list(durations, replicas))
        best = min(max(sum(d for d, r in zip(durations, who) if r == k) for k in range(replicas))
                   for who in itertools.product(range(replicas), repeat=len(durations)))
        assert best - 1e-9 <= lpt <= (4 / 3 - 1 / (3 * replicas)) * best + 1e-9  # Graham's bound
    fifo = list_schedule([1, 1, 1, 3], 2, longest_first=False)
    assert fifo == 4 and list_schedule([1, 1, 1, 3], 2) == 3
    # a shard runs its prefix on its own windows only: sharding adds no work, chunking does
    one = [Candidate(10.0, 1.0, 1), Candidate(0.0, 1.0, 2)]
    assert simulate_step(one, 4, 1, 2, 1.0, policy="shards", straggler=0, tile_overhead_s=0).seconds == \
        pytest.approx((10 + 2) * 4 / 2)
    # the scorer: a step with 1 candidate on 2 replicas is cut at batch boundaries into 2+ tiles
    single = [Candidate(0.0, 1.0, 2)]
    assert simulate_step(single, 16, 1, 2, 1.0, batch_size=4, straggler=0, tile_overhead_s=0).seconds == \
        pytest.approx(8.0)


def test_the_plans_tiles_are_the_scorers():
    """The plan's ``scorer`` tiling is the scorer's rule (both use search_spaces.tiling)."""
    import random

    from cluster.plan_dispatch import tiling
    from search_spaces.tiling import balanced_chunks, window_shards

    rng = random.Random(1)
    for _ in range(200):
        masks, actors, windows, batch = rng.randint(1, 70), rng.randint(1, 20), rng.randint(1, 300), rng.randint(1, 8)
        chunks, shards = tiling(masks, actors, windows, batch_size=batch)
        assert chunks == len(balanced_chunks([1] * masks, 1 if actors == 1 else 2 * actors))
        assert shards == [b - a for a, b in window_shards(windows, batch, chunks, actors)]


def test_loading_held_out_and_export_appear_and_scale_with_the_dtype():
    hw = Hardware(startup_s=0.0, tile_overhead_s=0.0, straggler=0.0)
    half, full = (plan_campaign(LLAMA7, "7b", "blockpruner", 0.22, 65536, 8, hw, replica_gpus=1, dtype=d)
                  for d in ("bfloat16", "float32"))
    weights = 6738415616 * 2 / 1e9  # GB of bf16 at 1 GB/s
    assert half.load_s == pytest.approx(weights) and full.load_s == pytest.approx(2 * weights)
    assert half.reload_s == pytest.approx(weights)  # one restart by default
    assert full.export_s == pytest.approx(2 * half.export_s) and weights < half.export_s < 2 * weights
    assert full.heldout_s == pytest.approx(2 * half.heldout_s)  # fp32: TF32 at half the rate
    assert half.heldout_s > 0 and full.paths["middle"].engine_s == pytest.approx(2 * half.paths["middle"].engine_s)
    assert half.total_s() == pytest.approx(half.load_s + half.reload_s + half.paths["middle"].engine_s
                                           + half.heldout_s + half.export_s)
    assert gpus_per_replica(LLAMA70, Hardware(), "float32") == 5
    measured = Hardware(fp32_tflops=0.05)  # a CPU's measured rate is taken as given
    assert measured.flops("float32") == 5e10 and Hardware().flops("float32") == 17.5e12
    multi = plan_campaign(LLAMA7, "7b", "multipruner", 0.22, 65536, 8, hw, replica_gpus=1, mlp_group=1024)
    assert multi.load_s == pytest.approx(2 * weights)  # the channel order reads the checkpoint once more


def test_the_reference_table_covers_both_models_and_three_methods():
    from cluster.plan import reference_table

    table = reference_table()
    rows = [line for line in table.splitlines() if line.startswith("| llama2-")]
    assert len(rows) == 12
    assert {tuple(r.split(" | ")[1:3]) for r in rows} == {(m, g) for m in ("blockpruner", "multipruner", "sprint")
                                                          for g in ("8", "64")}
    assert "| llama2-70b | blockpruner | 64 | 3 | 16 |" in table
    assert "half the removed parameters from attention" in table and "1 GB/s" in table
    row = next(r for r in rows if r.startswith("| llama2-70b | blockpruner | 64 |"))
    engine = row.split(" | ")[9]  # e.g. "27.2 h (10.1-36.9 h)": the unit once in a range
    assert re.fullmatch(r"\d+\.\d h \(\d+\.\d-\d+\.\d h\)", engine), engine
    assert "as the scorer does" in table and "windows first" in reference_table(Hardware(tiling="shards"))
