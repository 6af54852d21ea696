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
