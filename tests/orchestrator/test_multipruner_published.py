"""MultiPruner's published Llama-2-7B 22% and Meta-Llama-3-8B 20% configs are where rayprune's
MultiPruner stops with the published recipe, when its choices follow the published ones.

The scorer below prefers, at every step, a candidate that the published config contains (blocks in
the published removal order), so the choices are the paper's; what is tested is the arithmetic
around them: each stage's stopping point (a stage's last step passes its budget), MLP groups of 1024
that do not divide 11008 (Llama-2-7B's layers end at 1792 = 11008 - 9 x 1024), the head units, and
MultiPruner's parameter count. Files: tests/data/multipruner/ (SOURCE.md names their origin).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.search import MultiPrunerSearcher
from search_spaces import Arch, Mask, dense_params, param_count
from search_spaces.budget import check_multipruner, family_defaults, multipruner_ratio
from search_spaces.pruning_config import mask_from_pruning_config

DATA = Path(__file__).resolve().parents[1] / "data" / "multipruner"
#: config.json of the two checkpoints (public constants; only what the parameter count reads).
LLAMA2_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
LLAMA3_8B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
             "rope_theta": 500000.0}
#: (config.json, file, dense and kept parameters of its eval.res.json)
PUBLISHED = {
    "Llama-2-7B": (LLAMA2_7B, "llama-2-7b.ratio_22.pruning_config.json", 6_738_415_616, 5_258_874_880),
    "Meta-Llama-3-8B": (LLAMA3_8B, "meta-llama-3-8b.ratio_20.pruning_config.json", 8_030_261_248, 6_423_842_816),
}


def published(name):
    config, file, dense, kept = PUBLISHED[name]
    arch = Arch.from_hf_config(config)
    data = json.loads((DATA / file).read_text())
    order = [("attn", i) for i in data["pruned_attn_idx"]] + [("mlp", i) for i in data["pruned_mlp_idx"]]
    return arch, mask_from_pruning_config(data, arch), order, dense, kept


def follow(target: Mask, order, arch: Arch):
    """Scores that make the greedy choice the published one: a candidate the target contains scores
    its block's place in the published removal order (widths: 0); any other candidate 1000."""

    def contained(m: Mask) -> bool:
        return (m.attn_removed <= target.attn_removed and m.mlp_removed <= target.mlp_removed
                and all(m.heads_kept(l, arch.num_head_units) >= target.heads_kept(l, arch.num_head_units)
                        and m.mlp_kept(l, arch.intermediate_size) >= target.mlp_kept(l, arch.intermediate_size)
                        for l in range(arch.num_layers)))

    def score(base: Mask, m: Mask) -> float:
        if not contained(m):
            return 1000.0
        new = [("attn", i) for i in m.attn_removed - base.attn_removed] + \
              [("mlp", i) for i in m.mlp_removed - base.mlp_removed]
        return float(order.index(new[0])) if new else 0.0

    return score


def replay(arch, target_ratio, score, **settings):
    defaults = family_defaults(arch)
    settings = {"split": defaults.split, "mlp_group": defaults.mlp_group, "head_group": defaults.head_group,
                **settings}
    searcher = MultiPrunerSearcher(arch, target_ratio, **settings)
    while (p := searcher.suggest()) is not None:
        searcher.observe({m: score(p.base, m) for m in p.masks})
    return searcher


def stage_ends(searcher, arch):
    """MultiPruner's ratio after the last step of each kind of stage."""
    ends = {}
    for step in searcher.path:
        ends["blocks" if step.kind in ("attn", "mlp") else step.kind] = multipruner_ratio(step.mask, arch)
    return ends


def test_the_published_recipes_are_the_defaults_and_1024_is_accepted_on_11008():
    for name in PUBLISHED:
        arch = published(name)[0]
        defaults = family_defaults(arch)
        assert defaults.mlp_group == 1024 and defaults.head_group == 1 and name in defaults.why
        assert check_multipruner(arch, defaults.split, defaults.mlp_group, defaults.head_group) == []
    assert family_defaults(published("Llama-2-7B")[0]).split == (0.44, 0.52, 0.04)
    assert family_defaults(published("Meta-Llama-3-8B")[0]).split == (0.2, 0.8, 0.0)


def test_the_published_files_count_as_published():
    for name in PUBLISHED:
        arch, mask, _, dense, kept = published(name)
        assert dense_params(arch) == dense
        removed_blocks = len(mask.attn_removed) + len(mask.mlp_removed)
        assert param_count(mask, arch, count_removed_norms=True) == kept
        assert param_count(mask, arch) == kept - arch.hidden_size * removed_blocks  # rayprune's convention


def test_llama2_7b_22_percent_is_reproduced_with_overshooting_stages_and_groups_of_1024():
    arch, mask, order, _, kept = published("Llama-2-7B")
    # The file's ratio, 21.957%, ends the head stage; 22.00% would have taken two more heads. Its
    # target therefore lay in (ratio one head earlier, 21.957%]: we replay at the file's own ratio.
    target = multipruner_ratio(mask, arch)
    searcher = replay(arch, target, follow(mask, order, arch))
    assert searcher.current == mask
    assert param_count(searcher.current, arch, count_removed_norms=True) == kept
    kinds = [s.kind for s in searcher.path]
    assert kinds == ["attn"] * 9 + ["mlp"] + ["mlp_width"] * 55 + ["attn_width"] * 23
    ends = stage_ends(searcher, arch)
    assert ends["blocks"] == pytest.approx(0.1097, abs=5e-5) and ends["blocks"] > 0.44 * target  # 10.97% vs 9.66%
    assert ends["mlp_width"] > 0.96 * target  # the MLP stage passes its budget too
    assert {w for _, w in searcher.current.mlp_width} >= {1792}  # 11008 - 9 x 1024: not a multiple of the group
    at_22 = replay(arch, 0.22, follow(mask, order, arch))
    assert [s.kind for s in at_22.path].count("attn_width") == 25


def test_llama2_7b_within_stops_the_block_stage_short_and_misses_the_published_config():
    arch, mask, order, _, _ = published("Llama-2-7B")
    target = multipruner_ratio(mask, arch)
    within = replay(arch, target, follow(mask, order, arch), stage_stop="within")
    ends = stage_ends(within, arch)
    assert ends["blocks"] == pytest.approx(0.0896, abs=5e-5)  # nine attention blocks; the MLP block would pass 9.66%
    assert within.current != mask and 8 not in within.current.mlp_removed


def test_a_dividing_group_cannot_reach_the_published_widths():
    arch, mask, order, _, _ = published("Llama-2-7B")
    searcher = replay(arch, multipruner_ratio(mask, arch), follow(mask, order, arch), mlp_group=688)
    assert searcher.current != mask  # 11008 - 1792 = 9216 is not a multiple of 688
    assert all((11008 - w) % 688 == 0 for _, w in searcher.current.mlp_width)


def test_meta_llama3_8b_20_percent_is_reproduced():
    arch, mask, order, _, kept = published("Meta-Llama-3-8B")
    searcher = replay(arch, 0.20, follow(mask, order, arch))
    assert searcher.current == mask
    assert param_count(searcher.current, arch, count_removed_norms=True) == kept
    ends = stage_ends(searcher, arch)
    assert ends["blocks"] > 0.2 * 0.20 and "attn_width" not in ends  # 20:80:0: no head stage
    assert [s.kind for s in searcher.path] == ["attn"] * 8 + ["mlp_width"] * 101
    assert min(w for _, w in searcher.current.mlp_width) == 1024  # 14336 = 14 x 1024: w - G > 0 stops at G
