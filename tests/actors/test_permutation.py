"""The channel order is computed once, in float64, from the checkpoint: the same in every dtype and
process, stored as a checked safetensors file, named by the fingerprint, and used by the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.evaluator import Evaluator
from actors.export import compact_model, export_compact, load_pruned
from actors.fingerprint import model_fingerprint
from actors.permutation import (METHOD, METHOD_KV_REP, BadPermutation, Permutation, apply_permutation_,
                                checkpoint_permutation, l1_permutation, permutation_for, state_permutation)
from search_spaces import Arch, Mask
from tests.tiny import save_tiny, tiny_arch, tiny_model

WIDTH = 24  # of the tiny models' 48 MLP channels: a width mask that keeps half
DTYPES = ("float32", "bfloat16", "float16")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def windows():
    return {"calibration": np.random.default_rng(0).integers(0, 97, size=(2, 16))}


def _width_mask(arch) -> Mask:
    return Mask(mlp_width={layer: WIDTH for layer in range(arch.num_layers)})


def _checkpoint_rows(directory, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    from pathlib import Path

    return load_file(str(next(Path(directory).glob("*.safetensors"))))[name]


# ---- the problem: an order computed per process depends on the dtype --------------------------------
def test_an_order_computed_from_bf16_weights_differs_from_the_checkpoints():
    """Why the order is not recomputed per replica: from the weights as loaded in bf16, the tiny
    Llama's order moves channels (SmolLM2: 43,119 positions, 213 kept channels at width 1280)."""
    arch = tiny_arch("llama")
    fp32 = state_permutation(tiny_model("llama").state_dict(), arch)
    bf16 = state_permutation(tiny_model("llama").to(torch.bfloat16).state_dict(), arch)
    differ = [w for a, b in zip(fp32.mlp, bf16.mlp) for w in range(1, arch.intermediate_size)
              if set(a[:w]) != set(b[:w])]
    assert fp32.digest != bf16.digest and differ  # some width would keep other channels


# ---- computed once, from the checkpoint -----------------------------------------------------------
def test_the_replicas_order_is_the_same_in_every_dtype(tiny_dir, windows):
    expected = checkpoint_permutation(tiny_dir, cache=False)
    replicas = {d: Evaluator(tiny_dir, windows, batch_size=2, dtype=d) for d in DTYPES}
    assert {r.permutation.digest for r in replicas.values()} == {expected.digest}
    tags = {r.model_fingerprint.split("+")[1] for r in replicas.values()}
    assert tags == {expected.tag}
    # The replica's first WIDTH gate rows are the checkpoint's rows named by the order, in each dtype.
    gate = _checkpoint_rows(tiny_dir, "model.layers.2.mlp.gate_proj.weight")
    for dtype, replica in replicas.items():
        kept = replica.model.model.layers[2].mlp.gate_proj.weight[:WIDTH]
        assert torch.equal(kept, gate[expected.mlp[2][:WIDTH]].to(getattr(torch, dtype)))


def test_the_checkpoint_order_reads_every_stored_dtype_and_shard_layout(tmp_path):
    """bf16, fp16 and sharded checkpoints of the same weights: each order is the float64 order of
    the weights as stored (read through the memory map, bf16 widened exactly)."""
    arch = tiny_arch("llama")
    for dtype in ("bfloat16", "float16"):
        model = tiny_model("llama").to(getattr(torch, dtype))
        model.save_pretrained(tmp_path / dtype)
        assert checkpoint_permutation(tmp_path / dtype, cache=False).digest == \
            state_permutation(model.state_dict(), arch).digest
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert checkpoint_permutation(tmp_path / "sharded", cache=False).digest == \
        state_permutation(model.state_dict(), arch).digest


def test_the_order_is_a_function_preserving_permutation_of_every_layer(tiny_dir):
    arch = tiny_arch("llama")
    permutation = checkpoint_permutation(tiny_dir, cache=False)
    permutation.check(arch)
    assert not permutation.is_identity()
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = tiny_model("llama")(ids).logits
    reordered = apply_permutation_(tiny_model("llama"), arch, permutation)(ids).logits
    torch.testing.assert_close(reordered, dense, atol=1e-5, rtol=0)
    # Importance really is descending: each layer's first channel scores at least its last.
    gate = _checkpoint_rows(tiny_dir, "model.layers.0.mlp.gate_proj.weight").double().abs().sum(1)
    up = _checkpoint_rows(tiny_dir, "model.layers.0.mlp.up_proj.weight").double().abs().sum(1)
    scores = (gate + up)[permutation.mlp[0]]
    assert torch.all(scores[:-1] >= scores[1:])


def test_it_is_cached_per_machine_and_recomputed_when_the_weights_change(tiny_dir, tmp_path):
    first = checkpoint_permutation(tiny_dir)
    assert permutation_for(str(tiny_dir), first) is first  # still the weights it was computed from
    other = save_tiny("llama", tmp_path / "other")
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[0].mul_(100)  # channel 0 becomes the most important
    model.save_pretrained(other)
    fresh = permutation_for(str(other), first)
    assert fresh.checkpoint == model_fingerprint(other) != first.checkpoint
    assert fresh.mlp[0][0] == 0


# ---- the file -------------------------------------------------------------------------------------
def test_the_file_round_trips_and_refuses_corruption(tiny_dir, tmp_path):
    permutation = checkpoint_permutation(tiny_dir, cache=False)
    file = permutation.save(tmp_path / "permutation.safetensors")
    loaded = Permutation.load(file)
    assert loaded.digest == permutation.digest and loaded.checkpoint == permutation.checkpoint
    assert all(np.array_equal(a, b) for a, b in zip(loaded.mlp, permutation.mlp))

    data = bytearray(file.read_bytes())
    data[-8] ^= 1  # one bit of the last order
    with pytest.raises(BadPermutation, match="corrupt"):
        Permutation.from_bytes(bytes(data), source="x")
    with pytest.raises(BadPermutation, match="not a rayprune permutation file"):
        Permutation.from_bytes(b"garbage!", source="x")
    swapped = Permutation(permutation.checkpoint, (permutation.mlp[0][:-1],) + permutation.mlp[1:], permutation.units)
    with pytest.raises(BadPermutation, match="not a permutation of 48"):
        swapped.check(tiny_arch("llama"))


def test_a_replica_refuses_an_order_computed_from_other_weights(tiny_dir, tmp_path, windows):
    foreign = Permutation("sha-of-other-weights", *(lambda p: (p.mlp, p.units))(checkpoint_permutation(tiny_dir)))
    with pytest.raises(BadPermutation, match="computed from other weights"):
        Evaluator(tiny_dir, windows, batch_size=2, permutation=foreign)
    with pytest.raises(BadPermutation, match="computed from other weights"):
        compact_model(tiny_dir, Mask(), permutation=foreign)


# ---- the export keeps what the search scored, in any dtype ----------------------------------------
def test_a_bf16_width_export_keeps_exactly_the_channels_the_bf16_search_scored(tiny_dir, tmp_path, windows):
    arch = tiny_arch("llama")
    replica = Evaluator(tiny_dir, windows, batch_size=2, dtype="bfloat16")
    mask = _width_mask(arch)
    for dtype in ("bfloat16", "float32"):
        out = export_compact(tiny_dir, mask, tmp_path / dtype, dtype=dtype, permutation=replica.permutation)
        assert json.loads((out / "config.json").read_text())["rayprune"]["reordered"] == replica.permutation.tag
        exported = load_pruned(out)
        for layer in range(arch.num_layers):
            got = exported.model.layers[layer].mlp.gate_proj.weight
            scored = replica.model.model.layers[layer].mlp.gate_proj.weight[:WIDTH]  # what the search kept
            assert got.shape == (WIDTH, arch.hidden_size)
            assert torch.equal(got.to(torch.bfloat16), scored)
    # The same masked model: the replica's score equals the bf16 export's full forward.
    score = replica.evaluate("calibration", [mask.to_json()])[0]
    from actors.heldout import heldout_score

    export_score = heldout_score(load_pruned(tmp_path / "bfloat16"), torch.as_tensor(windows["calibration"]), batch_size=2)
    assert export_score.nll_sum == pytest.approx(score["nll_sum"], rel=2e-3)


def test_sprint_refits_exported_in_another_dtype_land_on_the_same_channels(tiny_dir, windows):
    """A refit is H x w columns in the replica's order: column j multiplies kept channel j. Exported in
    fp32 from a bf16 search, column j must still meet the gate/up rows of that same channel."""
    arch = tiny_arch("llama")
    replica = Evaluator(tiny_dir, windows, batch_size=2, dtype="bfloat16")
    layer = 1
    refit = torch.randn(arch.hidden_size, WIDTH, generator=torch.Generator().manual_seed(3))
    mask = _width_mask(arch)
    pruned = compact_model(tiny_dir, mask, dtype="float32", tuned={layer: refit}, permutation=replica.permutation)
    mlp = pruned.model.layers[layer].mlp
    assert torch.equal(mlp.down_proj.weight, refit)
    channels = replica.permutation.mlp[layer][:WIDTH]
    gate = _checkpoint_rows(tiny_dir, f"model.layers.{layer}.mlp.gate_proj.weight")
    assert torch.equal(mlp.gate_proj.weight, gate[channels])
    assert torch.equal(mlp.gate_proj.weight.to(torch.bfloat16),
                       replica.model.model.layers[layer].mlp.gate_proj.weight[:WIDTH])


# ---- GQA head units: k and v weighed n_rep times, as MultiPruner's reorder_in_attn_block -----------
def multipruner_unit_order(state, arch, layer: int) -> list[int]:
    """reorder_in_attn_block written out from its code: k and v viewed as (kv heads, head_dim, hidden),
    expanded to one copy per query head, row L1 norms added to q's, averaged per KV group (n_rep x
    head_dim rows), sorted descending."""
    n_rep, hd, hidden = arch.heads_per_unit, arch.head_dim, arch.hidden_size
    prefix = f"model.layers.{layer}.self_attn."
    total = state[prefix + "q_proj.weight"].double().abs().sum(1)
    for name in ("k_proj", "v_proj"):
        w = state[prefix + name + ".weight"].double().view(-1, hd, hidden)
        w = w[:, None].expand(arch.num_kv_heads, n_rep, hd, hidden).reshape(arch.num_kv_heads * n_rep * hd, hidden)
        total = total + w.abs().sum(1)
    per_head = total.view(-1, n_rep * hd).mean(-1)
    return torch.sort(per_head, descending=True).indices.tolist()


def planted_state(family: str, arch, layer: int = 1):
    """The tiny model with ``layer``'s units scaled so that unit 0 leads on q and unit 1 on k/v: the
    L1 order of its units then depends on how often k and v count (q0 + kv0 = 11 > 10 = q1 + kv1,
    q0 + 2 kv0 = 12 < 15 = q1 + 2 kv1)."""
    state = {k: v.clone() for k, v in tiny_model(family).state_dict().items()}
    hd, g = arch.head_dim, arch.heads_per_unit
    prefix = f"model.layers.{layer}.self_attn."
    with torch.no_grad():
        for unit, (q_sum, kv_sum) in enumerate([(10.0, 1.0), (5.0, 5.0)]):
            q = state[prefix + "q_proj.weight"][unit * g * hd:(unit + 1) * g * hd]
            q.mul_(q_sum / q.abs().sum())
            for name in ("k_proj", "v_proj"):
                kv = state[prefix + name + ".weight"][unit * hd:(unit + 1) * hd]
                kv.mul_(kv_sum / 2 / kv.abs().sum())
    return state


def test_gqa_units_are_ordered_as_multipruners_reorder(family):
    arch = tiny_arch(family)
    assert arch.heads_per_unit == 2
    for state in (tiny_model(family).state_dict(), planted_state(family, arch)):
        ours = state_permutation(state, arch)
        assert ours.method == METHOD_KV_REP
        assert [ours.units[l].tolist() for l in range(arch.num_layers)] == \
            [multipruner_unit_order(state, arch, l) for l in range(arch.num_layers)]
    planted = planted_state(family, arch)
    assert state_permutation(planted, arch).units[1].tolist() == [1, 0]
    once = state_permutation(planted, arch, kv_weight="once")
    assert once.method == METHOD and once.units[1].tolist() == [0, 1]  # rayprune's order before issue #14


def test_the_two_weightings_have_their_own_tags_and_a_stored_order_of_the_other_is_not_reused(tiny_dir, tmp_path):
    ours = checkpoint_permutation(tiny_dir)
    old = checkpoint_permutation(tiny_dir, kv_weight="once")  # what a run before issue #14 stored
    assert (ours.method, old.method) == (METHOD_KV_REP, METHOD) and ours.tag != old.tag
    assert checkpoint_permutation(tiny_dir) is not old and checkpoint_permutation(tiny_dir).method == METHOD_KV_REP
    stored = Permutation.load(old.save(tmp_path / "permutation.safetensors"))  # old files still load
    assert stored.method == METHOD and stored.digest == old.digest
    fresh = permutation_for(str(tiny_dir), stored)
    assert fresh.method == METHOD_KV_REP and fresh.tag == ours.tag != stored.tag
    assert permutation_for(str(tiny_dir), stored, kv_weight="once") is stored
    assert permutation_for(str(tiny_dir), ours) is ours
    with pytest.raises(ValueError, match="kv_weight 'twice' must be one of n_rep, once"):
        checkpoint_permutation(tiny_dir, kv_weight="twice")


def test_without_gqa_both_weightings_are_one_order_with_the_earlier_name():
    """No GQA (Llama-2, Qwen1.5): k and v rows count once either way, so the order keeps the name,
    digest and tag that runs before issue #14 stored, and their caches still serve."""
    arch = Arch("llama", 2, 16, 24, 2, 2, 8, 50, False)
    rng = np.random.default_rng(0)
    rows = {f"layers.{i}.{n}": rng.random(24 if "mlp" in n else 16) for i in range(2)
            for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    a = l1_permutation(rows.__getitem__, arch, "ck")
    b = l1_permutation(rows.__getitem__, arch, "ck", kv_weight="once")
    assert a.method == b.method == METHOD and a.digest == b.digest
