"""BlockPruner's searcher, driven by the prefix-reuse engine, takes the naive greedy loop's path."""

from __future__ import annotations

import math

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from orchestrator.search import BlockPrunerSearcher
from search_spaces import Block, Mask, ratio
from tests.tiny import tiny_arch, tiny_model


def _ppl(score) -> float:
    return math.exp(score.nll_sum / score.tokens)


def naive_greedy(engine, windows, arch, steps):
    """The algorithm as written in SPEC §2, with a full forward per candidate."""
    removed, path = Mask(), []
    for _ in range(steps):
        best = None
        for index in range(arch.num_blocks):
            block = Block.from_index(index)
            if removed.removed(block):
                continue
            ppl = _ppl(engine.score_masks_naive(windows, [removed.remove(block)])[0])
            if best is None or ppl < best[0]:  # strict: ties keep the lower block index
                best = (ppl, block)
        removed = removed.remove(best[1])
        path.append((best[1].kind, best[1].layer, best[0]))
    return path


def drive(searcher, engine, windows):
    while (proposal := searcher.suggest()) is not None:
        scores = engine.score_masks(windows, proposal.masks, base=proposal.base)
        searcher.observe({m: _ppl(s) for m, s in zip(proposal.masks, scores)})
    return searcher


def test_greedy_path_equals_naive_loop(family):
    arch = tiny_arch(family)
    engine = Engine(LeanDecoder(tiny_model(family), arch), batch_size=2)
    windows = torch.randint(0, arch.vocab_size, (4, 24), generator=torch.Generator().manual_seed(5))
    searcher = drive(BlockPrunerSearcher(arch, target_ratio=0.99, max_steps=5), engine, windows)
    ours = [(s.kind, s.layer, s.ppl) for s in searcher.path]
    reference = naive_greedy(engine, windows, arch, 5)
    assert [(k, l) for k, l, _ in ours] == [(k, l) for k, l, _ in reference]
    assert [p for *_, p in ours] == pytest.approx([p for *_, p in reference], rel=1e-6)
    assert searcher.dense_ppl == pytest.approx(_ppl(engine.score_masks_naive(windows, [Mask()])[0]), rel=1e-6)


def test_stops_at_target_ratio_and_ranks_nan_last():
    arch = tiny_arch("llama")
    searcher = BlockPrunerSearcher(arch, target_ratio=0.2)
    proposal = searcher.suggest()
    assert proposal.masks[0] == Mask() and len(proposal.masks) == 1 + arch.num_blocks
    # Every candidate ties at 2.0 except the first, which is NaN: the tie goes to the lowest index after it.
    scores = {m: 2.0 for m in proposal.masks}
    scores[proposal.masks[1]] = math.nan
    searcher.observe(scores)
    assert (searcher.path[0].kind, searcher.path[0].layer) == ("mlp", 0)
    while (proposal := searcher.suggest()) is not None:
        searcher.observe({m: 1.0 for m in proposal.masks})
    assert ratio(searcher.current, arch) >= 0.2
    assert ratio(searcher.path[-2].mask, arch) < 0.2


def test_observe_without_suggest_is_an_error():
    with pytest.raises(RuntimeError):
        BlockPrunerSearcher(tiny_arch("llama"), 0.5).observe({})
