"""Latency measurement: cached per device and model, noisy tables refused, the replica left as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch

import actors.latency as latency
from search_spaces import Mask
from search_spaces.latency import BlockCosts, Scenario, mask_latency
from tests.tiny import tiny_arch, tiny_model


def test_blocks_removed_is_undone():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
        with latency.blocks_removed(model, attn=True, mlp=True):
            gone = model(ids).logits
        after = model(ids).logits
    assert torch.equal(before, after) and not torch.allclose(before, gone)


def test_block_clocks_time_every_block_of_a_forward():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), latency.block_clocks(model) as samples:
        model(ids, use_cache=False)
    assert set(samples) == {(kind, i, 12) for kind in ("attn", "mlp") for i in range(4)}
    assert all(len(v) == 1 and v[0] > 0 for v in samples.values())
    assert not model.model.layers[0].self_attn._forward_hooks  # hooks are gone afterwards


def test_table_is_measured_once_per_entry_and_cached(tmp_path, monkeypatch):
    model, arch = tiny_model("llama"), tiny_arch("llama")
    table = latency.latency_table(model, arch, "fp" * 20, Scenario(16, 2), repeats=1, root=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and latency.device_name(torch.device("cpu")) in files[0].name
    stored = json.loads(files[0].read_text())
    assert set(stored["costs"]) == {"prefill:16", "decode:16"}
    assert len(stored["meta"]["per_layer"]["decode:16"]["mlp"]) == arch.num_layers
    for key, costs in table.costs.items():
        assert costs.attn > 0 and costs.mlp > 0 and costs.fixed > 0
        assert mask_latency(Mask(), arch, costs) == pytest.approx(table.dense[key] * (1 + table.meta["additivity"][key]))

    measured = []
    real = latency.measure_entry
    monkeypatch.setattr(latency, "measure_entry", lambda *a, **k: measured.append(a[2:4]) or real(*a, **k))
    again = latency.latency_table(model, arch, "fp" * 20, Scenario(16, 2), repeats=1, root=tmp_path)
    assert again == table and measured == []  # served from the cache
    latency.latency_table(model, arch, "fp" * 20, Scenario(32, 0), repeats=1, root=tmp_path)
    assert measured == [("prefill", 32)]  # only what was missing
    assert set(json.loads(files[0].read_text())["costs"]) == {"prefill:16", "decode:16", "prefill:32"}


def test_a_table_that_saves_nothing_is_remeasured_then_refused_and_not_cached(tmp_path, monkeypatch):
    model, arch = tiny_model("llama"), tiny_arch("llama")
    rounds = []
    monkeypatch.setattr(latency, "measure_entry",
                        lambda *a, **k: rounds.append(a[4]) or (BlockCosts(1.0, -0.01, 0.3), 2.0, 0.0, {}))
    with pytest.raises(RuntimeError, match="removing one attn block saves"):
        latency.latency_table(model, arch, "fp" * 20, Scenario(16, 0), repeats=1, root=tmp_path)
    assert rounds == [1, 2, 4] and not list(tmp_path.glob("*.json"))


def test_real_timings_of_a_tiny_model_are_finite():
    costs, dense, additivity, _ = latency.measure_entry(tiny_model("mistral"), 4, "decode", 8, repeats=1)
    assert dense > 0 and all(math.isfinite(v) for v in (costs.fixed, costs.attn, costs.mlp, additivity))
    assert latency.measure_latency(tiny_model("qwen2"), Scenario(8, 3), repeats=1) > 0
