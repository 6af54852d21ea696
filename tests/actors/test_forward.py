"""The lean masked forward equals the physically pruned stock model."""

from __future__ import annotations

import pytest
import torch

from actors.forward import LeanDecoder
from actors.surgery import count_parameters, prune_model_
from search_spaces import Block, Mask, param_count
from tests.tiny import tiny_arch, tiny_model

MASKS = [
    Mask(),
    Mask(attn_removed={0}),
    Mask(attn_removed={1, 3}, mlp_removed={0, 2}),
    Mask(mlp_removed={3}, head_units={0: 1, 2: 1}, mlp_width={1: 16, 3: 8}),
    Mask(attn_removed={0, 1, 2, 3}, mlp_removed={0, 1, 2, 3}),
]


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_param_count_equals_really_pruned_model(family, mask):
    arch = tiny_arch(family)
    pruned = prune_model_(tiny_model(family), mask, arch)
    assert count_parameters(pruned) == param_count(mask, arch)


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_masked_logits_equal_really_pruned_model(family, mask):
    arch = tiny_arch(family)
    ids = torch.randint(0, arch.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        masked = LeanDecoder(tiny_model(family), arch).forward_logits(ids, mask)
        pruned = prune_model_(tiny_model(family), mask, arch)(ids).logits
    torch.testing.assert_close(masked, pruned, atol=1e-5, rtol=0)


def test_dense_lean_nll_equals_stock_loss(family):
    arch = tiny_arch(family)
    model = tiny_model(family)
    ids = torch.randint(0, arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        lean = LeanDecoder(model, arch)
        nll, tokens = lean.nll(lean.run(lean.embed(ids), Mask()), ids)
        stock = model(ids, labels=ids).loss.item()
    assert tokens == 2 * 32
    assert nll / tokens == pytest.approx(stock, rel=1e-6)


def test_removing_a_block_changes_the_output(family):
    arch = tiny_arch(family)
    ids = torch.randint(0, arch.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        lean = LeanDecoder(tiny_model(family), arch)
        dense = lean.forward_logits(ids, Mask())
        pruned = lean.forward_logits(ids, Mask().remove(Block(2, "mlp")))
    assert (dense - pruned).abs().max() > 1e-3


def test_l1_reordering_leaves_logits_unchanged(family):
    from tests.tiny import reorder_by_l1_

    arch = tiny_arch(family)
    ids = torch.randint(0, arch.vocab_size, (2, 20), generator=torch.Generator().manual_seed(8))
    model = reorder_by_l1_(tiny_model(family), arch)
    with torch.inference_mode():
        dense = tiny_model(family)(ids).logits
        reordered = model(ids).logits
    torch.testing.assert_close(reordered, dense, atol=1e-5, rtol=0)
    mlp, attn = model.model.layers[1].mlp, model.model.layers[1].self_attn
    channel_scores = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
    assert torch.all(channel_scores[:-1] >= channel_scores[1:])
    units = arch.num_kv_heads
    unit_scores = sum(p.weight.abs().view(units, -1).sum(1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert torch.all(unit_scores[:-1] >= unit_scores[1:])
    assert not torch.equal(tiny_model(family).model.layers[1].mlp.gate_proj.weight, mlp.gate_proj.weight)


# ---- sliding windows: per layer, as transformers applies them --------------------------------------
def _windowed(family: str, **window):
    """A tiny model of ``family`` with a sliding window of 6 tokens (and its Arch)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from search_spaces import Arch
    from tests.tiny import COMMON

    torch.manual_seed(4)
    config = AutoConfig.for_model(family, **COMMON, **window)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, Arch.from_hf_config(config.to_dict())


@pytest.mark.parametrize("family,window,expected", [
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=2), [None, None, 6, 6]),
    ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=0), [6, 6, 6, 6]),
    ("qwen2", dict(use_sliding_window=False, sliding_window=6, max_window_layers=2), [None] * 4),
    ("mistral", dict(sliding_window=6), [6, 6, 6, 6]),
], ids=["qwen2-from-layer-2", "qwen2-all", "qwen2-off", "mistral"])
def test_sliding_window_applies_where_transformers_applies_it(family, window, expected):
    """Qwen2 slides only at or past max_window_layers (transformers' layer_types); the lean forward
    gives transformers' own logits, masked blocks included (against the physically pruned model)."""
    from actors.forward import layer_windows

    model, arch = _windowed(family, **window)
    assert layer_windows(model.config, arch) == expected
    ids = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))  # 24 > 6
    with torch.inference_mode():
        lean = LeanDecoder(model, arch)
        torch.testing.assert_close(lean.forward_logits(ids, Mask()), model(ids).logits, atol=1e-5, rtol=0)
        mask = Mask(attn_removed={1}, head_units={2: 1}, mlp_width={3: 16})
        masked = lean.forward_logits(ids, mask)
        pruned = prune_model_(_windowed(family, **window)[0], mask, arch)(ids).logits
    torch.testing.assert_close(masked, pruned, atol=1e-5, rtol=0)


def test_a_window_on_every_qwen2_layer_is_not_what_transformers_computes():
    """The check above can fail: windowing the full-attention layers 0-1 too changes the logits."""
    model, arch = _windowed("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    ids = torch.randint(0, arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        lean = LeanDecoder(model, arch)
        lean.windows = [6] * arch.num_layers
        assert (lean.forward_logits(ids, Mask()) - model(ids).logits).abs().max() > 1e-3


def test_layer_types_of_the_wrong_length_are_refused_and_a_missing_list_is_derived():
    import types

    from actors.forward import layer_windows

    _, arch = _windowed("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    assert layer_windows(types.SimpleNamespace(max_window_layers=3), arch) == [None, None, None, 6]
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        layer_windows(types.SimpleNamespace(layer_types=["full_attention"] * 3), arch)
