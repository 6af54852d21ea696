"""MultiPruner: its loop as its code runs it (stage overshoot, non-dividing groups, its parameter
count, its tie order), rayprune's earlier ``within`` rule, and the stage plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from orchestrator.search import MultiPrunerSearcher
from search_spaces import Block, Mask, ratio
from search_spaces.budget import multipruner_ratio, stage_budgets
from tests.tiny import reorder_by_l1_, tiny_arch, tiny_model

SPLIT, TARGET = (0.3, 0.5, 0.2), 0.5
MLP_GROUP = 20  # does not divide the tiny MLP width 48: widths run 48, 28, 8 (8 - 20 <= 0 stops)


def _setup(family):
    arch = tiny_arch(family)
    model = reorder_by_l1_(tiny_model(family), arch)
    engine = Engine(LeanDecoder(model, arch), batch_size=2)
    windows = torch.randint(0, arch.vocab_size, (4, 24), generator=torch.Generator().manual_seed(11))
    return arch, model, engine, windows


def _ppl(engine, windows, mask):
    s = engine.score_masks_naive(windows, [mask])[0]
    return math.exp(s.nll_sum / s.tokens)


def run_searcher(searcher, engine, windows):
    """Drive a searcher with the engine; returns the path and every mask it proposed."""
    proposed = []
    while (p := searcher.suggest()) is not None:
        proposed.extend(p.masks)
        scores = engine.score_masks(windows, p.masks, base=p.base)
        searcher.observe({m: math.exp(s.nll_sum / s.tokens) for m, s in zip(p.masks, scores)})
    return [(s.kind, s.layer, s.ppl) for s in searcher.path], proposed


# ---- MultiPruner's loop, written out from run_multipruner.py ---------------------------------------
def multipruner_params(model, config, n_rep):
    """run_multipruner.py's count_parameters on a masked model: everything outside the attention and
    MLP modules (norms of removed blocks included), masked q/k/v/o and gate/up/down sizes."""
    layers = model.model.layers
    inside = {id(p) for layer in layers for p in layer.parameters()}
    total = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    for i, layer in enumerate(layers):
        modules = {id(p) for m in (layer.self_attn, layer.mlp) for p in m.parameters()}
        total += sum(p.numel() for p in layer.parameters() if id(p) not in modules)
        if i not in config["pruned_attn_idx"]:
            width = config["pruned_attn_width"][i]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                linear = getattr(layer.self_attn, name)
                out = {"q_proj": width, "k_proj": width // n_rep, "v_proj": width // n_rep}.get(name)
                rows, cols = (out, linear.in_features) if out is not None else (linear.out_features, width)
                total += rows * cols + (0 if linear.bias is None else rows)
        if i not in config["pruned_mlp_idx"]:
            width = config["pruned_mlp_width"][i]
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = getattr(layer.mlp, name)
                rows, cols = (width, linear.in_features) if name != "down_proj" else (linear.out_features, width)
                total += rows * cols + (0 if linear.bias is None else rows)
    return total


def config_to_mask(config, arch):
    unit = arch.heads_per_unit * arch.head_dim
    attn, mlp, full = set(config["pruned_attn_idx"]), set(config["pruned_mlp_idx"]), arch.num_heads * arch.head_dim
    return Mask(attn, mlp,
                {l: w // unit for l, w in config["pruned_attn_width"].items() if l not in attn and w < full},
                {l: w for l, w in config["pruned_mlp_width"].items() if l not in mlp and w < arch.intermediate_size})


def multipruner_loop(model, arch, ppl, target_pct, distribution, mlp_group, attn_group):
    """The three ``while current_ratio < target`` loops of run_multipruner.py: ratios in percent from
    its own parameter count, shares normalised by their sum, attention candidates before MLP ones,
    strict ``<`` (the first of equal scores wins), width steps while ``width - group > 0``.
    Returns the path, the candidate masks of every step, and the ratio after each stage."""
    n_rep = arch.heads_per_unit
    config = {"pruned_attn_idx": [], "pruned_mlp_idx": [],
              "pruned_attn_width": {i: arch.num_heads * arch.head_dim for i in range(arch.num_layers)},
              "pruned_mlp_width": {i: arch.intermediate_size for i in range(arch.num_layers)}}
    total = multipruner_params(model, config, n_rep)
    shares = [x / sum(distribution) for x in distribution]
    block_t = target_pct * shares[0]
    targets = (block_t, block_t + target_pct * shares[1], target_pct)
    current, path, candidates_seen, stage_ends = 0.0, [], [], []

    def pick(candidates):
        best, lowest = None, float("inf")
        for kind, layer, apply, revert in candidates:
            apply()
            mask = config_to_mask(config, arch)
            candidates_seen.append(mask)
            score = ppl(mask)
            revert()
            if score < lowest:
                best, lowest = (kind, layer, apply), score
        best[2]()
        path.append((best[0], best[1], lowest))
        return 100 * (1 - multipruner_params(model, config, n_rep) / total)

    def block(key, i):
        return (lambda: config[key].append(i)), (lambda: config[key].pop())

    def width(key, i, new):
        old = config[key][i]
        return (lambda: config[key].__setitem__(i, new)), (lambda: config[key].__setitem__(i, old))

    while current < targets[0]:
        current = pick([("attn", i, *block("pruned_attn_idx", i)) for i in range(arch.num_layers)
                        if i not in config["pruned_attn_idx"]]
                       + [("mlp", i, *block("pruned_mlp_idx", i)) for i in range(arch.num_layers)
                          if i not in config["pruned_mlp_idx"]])
    stage_ends.append(current)
    for stage, (key, removed, group, kind) in enumerate(
            [("pruned_mlp_width", "pruned_mlp_idx", mlp_group, "mlp_width"),
             ("pruned_attn_width", "pruned_attn_idx", attn_group, "attn_width")], start=1):
        while current < targets[stage]:
            found = [(kind, i, *width(key, i, w - group)) for i, w in config[key].items()
                     if w - group > 0 and i not in config[removed]]
            if not found:  # (run_multipruner.py would fail here; rayprune moves on)
                break
            current = pick(found)
        stage_ends.append(current)
    return path, candidates_seen, stage_ends


def test_multipruner_equals_its_codes_loop_with_overshoot_and_a_non_dividing_group(family):
    arch, model, engine, windows = _setup(family)
    searcher = MultiPrunerSearcher(arch, TARGET, SPLIT, MLP_GROUP, 1)
    assert searcher.stage_stop == "overshoot"  # the default
    ours, proposed = run_searcher(searcher, engine, windows)
    reference, candidates, stage_ends = multipruner_loop(
        model, arch, lambda m: _ppl(engine, windows, m), 100 * TARGET, (30, 50, 20), MLP_GROUP,
        arch.heads_per_unit * arch.head_dim)  # --attn_channel_group_size: one KV group, in query channels
    assert [o[:2] for o in ours] == [r[:2] for r in reference]
    assert [o[2] for o in ours] == pytest.approx([r[2] for r in reference], rel=1e-6)
    assert set(proposed) - {Mask()} == set(candidates)  # the same candidates, remainder widths included
    assert any(8 in dict(m.mlp_width).values() for m in proposed)  # 48 - 2 x 20: a width below one group
    assert all(w in (28, 8) for m in proposed for _, w in m.mlp_width)
    # The block stage passed its budget (MultiPruner's count), the same as its loop did.
    budgets = stage_budgets(SPLIT, TARGET)
    last_block = max(i for i, s in enumerate(searcher.path) if s.kind in ("attn", "mlp"))
    reached = multipruner_ratio(searcher.path[last_block].mask, arch)
    assert reached > budgets[0] and 100 * reached == pytest.approx(stage_ends[0])
    assert multipruner_ratio(searcher.path[-1].mask, arch) >= TARGET and searcher.path[-1].ratio >= TARGET


def within_loop(engine, windows, arch, group):
    """rayprune's earlier rule written out plainly: a stage that is not the last never passes its
    budget (candidates past it are not proposed), on rayprune's ratio, blocks in block order."""

    def blocks(m):
        return [(b.kind, b.layer, m.remove(b)) for b in map(Block.from_index, range(arch.num_blocks)) if not m.removed(b)]

    def widths(m):
        return [("mlp_width", l, m.with_mlp_width(l, m.mlp_kept(l, 48) - group))
                for l in range(arch.num_layers) if m.mlp_kept(l, 48) - group > 0]

    def heads(m):
        return [("attn_width", l, m.with_heads(l, m.heads_kept(l, 2) - 1))
                for l in range(arch.num_layers) if m.heads_kept(l, 2) - 1 >= 1]

    mask, path = Mask(), []
    for stage, (candidates, budget) in enumerate(zip((blocks, widths, heads), stage_budgets(SPLIT, TARGET))):
        while ratio(mask, arch) < budget:
            found = [c for c in candidates(mask) if stage == 2 or ratio(c[2], arch) <= budget]
            if not found:
                break
            best = min(found, key=lambda c: _ppl(engine, windows, c[2]))
            mask = best[2]
            path.append((best[0], best[1], _ppl(engine, windows, mask)))
    return path


@pytest.mark.parametrize("group", [16, MLP_GROUP])
def test_within_keeps_every_stage_but_the_last_inside_its_budget(group):
    arch, _, engine, windows = _setup("llama")
    searcher = MultiPrunerSearcher(arch, TARGET, SPLIT, group, 1, stage_stop="within")
    ours, _ = run_searcher(searcher, engine, windows)
    reference = within_loop(engine, windows, arch, group)
    assert [o[:2] for o in ours] == [r[:2] for r in reference]
    assert [o[2] for o in ours] == pytest.approx([r[2] for r in reference], rel=1e-6)
    budgets = stage_budgets(SPLIT, TARGET)
    for step in searcher.path:
        limit = {"attn": budgets[0], "mlp": budgets[0], "mlp_width": budgets[1]}.get(step.kind, 1.0)
        assert step.ratio <= limit + 1e-12
    overshoot, _ = run_searcher(MultiPrunerSearcher(arch, TARGET, SPLIT, group, 1), engine, windows)
    assert [o[:2] for o in overshoot] != [o[:2] for o in ours]  # the two rules decide differently here


def test_ties_go_to_attention_first_as_in_multipruners_loop():
    """Equal scores: MultiPruner lists every attention block before any MLP block and keeps the
    first; ``within`` (rayprune's earlier rule) keeps block order (attn0, mlp0, attn1, ...)."""
    arch = tiny_arch("llama")

    tied = {Mask(attn_removed={3}), Mask(mlp_removed={0})}

    def first_step(stage_stop):
        searcher = MultiPrunerSearcher(arch, 0.1, (1.0, 0.0, 0.0), 16, 1, stage_stop=stage_stop)
        p = searcher.suggest()
        searcher.observe({m: 5.0 if m in tied else 9.0 for m in p.masks})
        return searcher.path[0].kind, searcher.path[0].layer

    assert first_step("overshoot") == ("attn", 3)
    p = MultiPrunerSearcher(arch, 0.1, (1.0, 0.0, 0.0), 16, 1).suggest()
    assert [(next(iter(m.attn_removed or m.mlp_removed)), "attn" if m.attn_removed else "mlp")
            for m in p.masks[1:]] == [(l, "attn") for l in range(4)] + [(l, "mlp") for l in range(4)]
    assert first_step("within") == ("mlp", 0)
    p = MultiPrunerSearcher(arch, 0.1, (1.0, 0.0, 0.0), 16, 1, stage_stop="within").suggest()
    assert [m.attn_removed and "attn" or "mlp" for m in p.masks[1:3]] == ["attn", "mlp"]


def test_a_bad_stage_stop_or_group_is_refused():
    arch = tiny_arch("llama")
    with pytest.raises(ValueError, match="stage_stop 'sometimes' must be one of overshoot, within"):
        MultiPrunerSearcher(arch, 0.3, SPLIT, 16, 1, stage_stop="sometimes")
    with pytest.raises(ValueError, match="mlp_group 0"):
        MultiPrunerSearcher(arch, 0.3, SPLIT, 0, 1)


def test_zero_share_stage_is_skipped():
    arch = tiny_arch("qwen2")
    searcher = MultiPrunerSearcher(arch, 0.2, (0.5, 0.5, 0.0), 16, 1)
    assert [s.name for s in searcher.stages] == ["blocks", "mlp width"]
    while (p := searcher.suggest()) is not None:
        searcher.observe({m: float(len(m.to_json())) for m in p.masks})
    assert all(s.kind != "attn_width" for s in searcher.path)


def test_stages_stop_on_multipruners_count_which_keeps_removed_norms():
    """A block stage whose budget lies between MultiPruner's ratio of a state and rayprune's (they
    differ by one norm weight per removed block): MultiPruner's loop takes another step there."""
    arch = tiny_arch("llama")
    first = Mask(attn_removed={0})
    assert multipruner_ratio(first, arch) < ratio(first, arch)
    target = (multipruner_ratio(first, arch) + ratio(first, arch)) / 2  # the block stage's budget (share 1)

    def steps(stage_stop):
        searcher = MultiPrunerSearcher(arch, target, (1.0, 0.0, 0.0), 16, 1, stage_stop=stage_stop)
        while (p := searcher.suggest()) is not None:
            searcher.observe({m: 1.0 if m == first else 2.0 for m in p.masks})
        return len(searcher.path)

    assert steps("overshoot") == 2 and steps("within") == 1
