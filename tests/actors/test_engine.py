"""Prefix reuse gives the naive loop's NLLs."""

from __future__ import annotations

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from search_spaces import Block, Mask
from tests.tiny import tiny_arch, tiny_model


def _candidates(arch, base: Mask) -> list[Mask]:
    blocks = [Block.from_index(i) for i in range(arch.num_blocks)]
    masks = [base.remove(b) for b in blocks if not base.removed(b)]
    masks += [base.with_mlp_width(1, 24), base.with_heads(3, 1)]  # width steps too
    return masks + [base]  # a mask equal to the base itself


@pytest.mark.parametrize("base", [Mask(), Mask(attn_removed={2}, mlp_removed={0}, mlp_width={3: 24})], ids=str)
def test_prefix_reuse_equals_naive(family, base):
    arch = tiny_arch(family)
    engine = Engine(LeanDecoder(tiny_model(family), arch), batch_size=2)
    windows = torch.randint(0, arch.vocab_size, (5, 30), generator=torch.Generator().manual_seed(0))
    masks = _candidates(arch, base)
    fast = engine.score_masks(windows, masks, base=base)
    naive = engine.score_masks_naive(windows, masks)
    for f, n in zip(fast, naive):
        assert f.tokens == n.tokens == 5 * 29
        assert f.nll_sum == pytest.approx(n.nll_sum, rel=1e-6)
    assert len({round(s.nll_sum, 6) for s in naive}) > len(masks) // 2  # the masks really differ


def test_unrelated_base_is_still_exact():
    arch = tiny_arch("llama")
    engine = Engine(LeanDecoder(tiny_model("llama"), arch), batch_size=3)
    windows = torch.randint(0, arch.vocab_size, (3, 20), generator=torch.Generator().manual_seed(4))
    masks = [Mask(attn_removed={0}), Mask(mlp_removed={3}, head_units={1: 1})]
    fast = engine.score_masks(windows, masks, base=Mask(mlp_removed={2}))
    naive = engine.score_masks_naive(windows, masks)
    assert [f.nll_sum for f in fast] == pytest.approx([n.nll_sum for n in naive], rel=1e-6)


def test_engine_equals_stock_forward_with_labels(family):
    """An independent oracle: the stock HF forward, mask applied in place the papers' way."""
    from actors.reference import stock_masked, stock_nll

    arch = tiny_arch(family)
    model = tiny_model(family)
    engine = Engine(LeanDecoder(model, arch), batch_size=2)
    windows = torch.randint(0, arch.vocab_size, (4, 20), generator=torch.Generator().manual_seed(6))
    masks = [Mask(), Mask(attn_removed={0}, mlp_removed={2}), Mask(head_units={1: 1}, mlp_width={0: 24})]
    ours = engine.score_masks(windows, masks, base=Mask())
    for mask, score in zip(masks, ours):
        with stock_masked(model, mask, arch):
            nll, tokens = stock_nll(model, windows, batch_size=2)
        assert tokens == score.tokens
        assert score.nll_sum == pytest.approx(nll, rel=1e-5)
    dense_again = stock_nll(model, windows, batch_size=2)[0]  # the context restored every weight
    assert dense_again == pytest.approx(ours[0].nll_sum, rel=1e-5)


def test_concurrent_streams_equal_sequential(family):
    arch = tiny_arch(family)
    model = tiny_model(family)
    windows = torch.randint(0, arch.vocab_size, (4, 24), generator=torch.Generator().manual_seed(7))
    base = Mask(mlp_removed={1})
    masks = _candidates(arch, base)
    one = Engine(LeanDecoder(model, arch), batch_size=2).score_masks(windows, masks, base=base)
    two = Engine(LeanDecoder(model, arch), batch_size=2, streams=2).score_masks(windows, masks, base=base)
    assert [s.nll_sum for s in two] == pytest.approx([s.nll_sum for s in one], rel=1e-6)
    assert torch.get_num_threads() >= 1  # restored after the concurrent phase
