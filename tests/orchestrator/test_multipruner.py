"""MultiPruner: stages in order, budgets respected, and the naive loop's decisions."""

from __future__ import annotations

import math

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from tests.tiny import reorder_by_l1_
from orchestrator.search import MultiPrunerSearcher
from search_spaces import Block, Mask, ratio
from search_spaces.budget import family_defaults, stage_budgets
from tests.tiny import tiny_arch, tiny_model

SPLIT, MLP_GROUP, TARGET = (0.3, 0.5, 0.2), 16, 0.3


def naive_multipruner(engine, windows, arch):
    """SPEC §2 written out plainly, one full forward per candidate."""

    def ppl(mask):
        s = engine.score_masks_naive(windows, [mask])[0]
        return math.exp(s.nll_sum / s.tokens)

    def blocks(m):
        return [(b.kind, b.layer, m.remove(b)) for b in map(Block.from_index, range(arch.num_blocks)) if not m.removed(b)]

    def widths(m):
        return [("mlp_width", l, m.with_mlp_width(l, m.mlp_kept(l, 48) - MLP_GROUP))
                for l in range(arch.num_layers) if m.mlp_kept(l, 48) - MLP_GROUP >= MLP_GROUP]

    def heads(m):
        return [("attn_width", l, m.with_heads(l, m.heads_kept(l, 2) - 1))
                for l in range(arch.num_layers) if m.heads_kept(l, 2) - 1 >= 1]

    mask, path = Mask(), []
    budgets = stage_budgets(SPLIT, TARGET)
    for stage, (candidates, budget) in enumerate(zip((blocks, widths, heads), budgets)):
        while ratio(mask, arch) < budget:
            found = [c for c in candidates(mask) if stage == 2 or ratio(c[2], arch) <= budget]
            if not found:
                break
            best = None
            for kind, layer, m in found:
                p = ppl(m)
                if best is None or p < best[0]:
                    best = (p, kind, layer, m)
            mask = best[3]
            path.append((best[1], best[2], best[0]))
    return path


def test_multipruner_equals_naive_loop(family):
    arch = tiny_arch(family)
    model = reorder_by_l1_(tiny_model(family), arch)
    engine = Engine(LeanDecoder(model, arch), batch_size=2)
    windows = torch.randint(0, arch.vocab_size, (4, 24), generator=torch.Generator().manual_seed(11))
    searcher = MultiPrunerSearcher(arch, TARGET, SPLIT, MLP_GROUP, 1)
    while (p := searcher.suggest()) is not None:
        scores = engine.score_masks(windows, p.masks, base=p.base)
        searcher.observe({m: math.exp(s.nll_sum / s.tokens) for m, s in zip(p.masks, scores)})
    ours = [(s.kind, s.layer, s.ppl) for s in searcher.path]
    reference = naive_multipruner(engine, windows, arch)
    assert [o[:2] for o in ours] == [r[:2] for r in reference]
    assert [o[2] for o in ours] == pytest.approx([r[2] for r in reference], rel=1e-6)
    kinds = [k for k, *_ in ours]
    assert {"attn_width", "mlp_width"} <= set(kinds)
    order = {"attn": 0, "mlp": 0, "mlp_width": 1, "attn_width": 2}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)  # stages in order
    budgets = stage_budgets(SPLIT, TARGET)
    for step in searcher.path:
        if step.kind in ("attn", "mlp"):
            assert step.ratio <= budgets[0] + 1e-12
        elif step.kind == "mlp_width":
            assert step.ratio <= budgets[1] + 1e-12
    assert searcher.path[-1].ratio >= TARGET or not searcher.suggest()


def test_zero_share_stage_is_skipped():
    arch = tiny_arch("qwen2")
    searcher = MultiPrunerSearcher(arch, 0.2, (0.5, 0.5, 0.0), 16, 1)
    assert [s.name for s in searcher.stages] == ["blocks", "mlp width"]
    while (p := searcher.suggest()) is not None:
        searcher.observe({m: float(len(m.to_json())) for m in p.masks})
    assert all(s.kind != "attn_width" for s in searcher.path)


def test_family_defaults_follow_the_paper():
    from search_spaces import Arch

    llama2 = Arch("llama", 32, 4096, 11008, 32, 32, 128, 32000, False)
    llama3 = Arch("llama", 32, 4096, 14336, 32, 8, 128, 128256, False)
    qwen = Arch("qwen2", 28, 3584, 18944, 28, 4, 128, 152064, False, qkv_bias=True)
    assert family_defaults(llama2).split == (0.44, 0.52, 0.04)
    assert family_defaults(llama2).mlp_group == 688  # 11008 = 16 x 688: the divisor nearest the paper's 1024
    assert family_defaults(llama3).split == (0.2, 0.8, 0.0)
    assert family_defaults(qwen).split == (0.5, 0.5, 0.0)
    smol = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)
    assert family_defaults(smol).split == (0.3, 0.6, 0.1) and family_defaults(smol).mlp_group == 256
