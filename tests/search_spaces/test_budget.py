"""MultiPruner's recipes as its repository publishes them, its stopping count, and the checks."""

from __future__ import annotations

import pytest

from search_spaces import Arch, Mask, ratio
from search_spaces.budget import (RECIPES, check_multipruner, dividing_group, family_defaults, multipruner_ratio,
                                  rope_type, stage_budgets)

# config.json shapes of the published models (public constants)
LLAMA2_7B = Arch("llama", 32, 4096, 11008, 32, 32, 128, 32000, False)
LLAMA2_13B = Arch("llama", 40, 5120, 13824, 40, 40, 128, 32000, False)
LLAMA3_8B = Arch("llama", 32, 4096, 14336, 32, 8, 128, 128256, False)
LLAMA32_3B = Arch("llama", 28, 3072, 8192, 24, 8, 128, 128256, True)
QWEN25_7B = Arch("qwen2", 28, 3584, 18944, 28, 4, 128, 152064, False, qkv_bias=True)
QWEN15_7B = Arch("qwen2", 32, 4096, 11008, 32, 32, 128, 151936, False, qkv_bias=True)
QWEN15_14B = Arch("qwen2", 40, 5120, 13696, 40, 40, 128, 152064, False, qkv_bias=True)
SMOL = Arch("llama", 30, 576, 1536, 9, 3, 64, 49152, True)
LLAMA31 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}


@pytest.mark.parametrize("arch,hf_config,split,group,model", [
    (LLAMA2_7B, None, (0.44, 0.52, 0.04), 1024, "Llama-2-7B"),
    (LLAMA2_13B, None, (0.44, 0.52, 0.04), 1024, "Llama-2-13B"),
    (LLAMA3_8B, None, (0.2, 0.8, 0.0), 1024, "Meta-Llama-3-8B"),
    (LLAMA3_8B, LLAMA31, (0.3, 0.7, 0.0), 1024, "Llama-3.1-8B"),
    (LLAMA32_3B, LLAMA31, (0.1, 0.9, 0.0), 768, "Llama-3.2-3B"),
    (LLAMA32_3B, None, (0.1, 0.9, 0.0), 768, "Llama-3.2-3B"),  # its shape alone names it
    (QWEN25_7B, None, (0.5, 0.5, 0.0), 1024, "Qwen2.5-7B"),
    (QWEN15_7B, None, (0.44, 0.52, 0.04), 1024, "Qwen1.5-7B"),
    (QWEN15_14B, None, (0.44, 0.52, 0.04), 2048, "Qwen1.5-14B"),
])
def test_each_published_recipe_is_the_default_of_its_model(arch, hf_config, split, group, model):
    defaults = family_defaults(arch, hf_config=hf_config)
    assert (defaults.split, defaults.mlp_group, defaults.head_group) == (split, group, 1)
    assert f"MultiPruner's {model} recipe" in defaults.why and "results/README.md" in defaults.why
    assert check_multipruner(arch, defaults.split, defaults.mlp_group, defaults.head_group) == []


def test_published_attention_groups_are_one_head_unit_each():
    """--attn_channel_group_size in query channels: 128 = one head (Llama-2, Qwen1.5), 512 = one KV
    group of 4 (Llama-3-8B), 384 = of 3 (Llama-3.2-3B), 896 = of 7 (Qwen2.5-7B)."""
    shapes = {"Llama-2-7B": LLAMA2_7B, "Meta-Llama-3-8B": LLAMA3_8B, "Llama-3.2-3B": LLAMA32_3B,
              "Qwen2.5-7B": QWEN25_7B, "Qwen1.5-14B": QWEN15_14B}
    for recipe in RECIPES:
        if recipe.model in shapes:
            arch = shapes[recipe.model]
            assert recipe.attn_channels == arch.heads_per_unit * arch.head_dim and recipe.head_units(arch) == 1


def test_family_rules_cover_other_sizes_and_small_models_keep_a_dividing_group():
    llama31_70b = Arch("llama", 80, 8192, 28672, 64, 8, 128, 128256, False)
    assert family_defaults(llama31_70b).split == (0.2, 0.8, 0.0)
    assert family_defaults(llama31_70b, hf_config=LLAMA31).split == (0.3, 0.7, 0.0)
    qwen25_05b = Arch("qwen2", 24, 896, 4864, 14, 2, 64, 151936, True, qkv_bias=True)
    assert (family_defaults(qwen25_05b).split, family_defaults(qwen25_05b).mlp_group) == ((0.5, 0.5, 0.0), 1024)
    assert "Qwen2.5-7B recipe of MultiPruner, applied to its family" in family_defaults(qwen25_05b).why
    tiny_qwen = Arch("qwen2", 4, 32, 48, 4, 2, 8, 97, False, qkv_bias=True)
    assert family_defaults(tiny_qwen).mlp_group == 8  # 1024 would leave no step: a divisor near 48 / 6
    smol = family_defaults(SMOL)
    assert (smol.split, smol.mlp_group, smol.head_group) == ((0.3, 0.6, 0.1), 256, 1)


def test_rope_type_reads_both_spellings():
    assert rope_type(LLAMA31) == "llama3" and rope_type({"rope_scaling": {"type": "linear"}}) == "linear"
    assert rope_type(None) is None and rope_type({"rope_scaling": None}) is None


def test_a_group_need_not_divide_but_must_leave_a_step():
    assert check_multipruner(LLAMA2_7B, (0.44, 0.52, 0.04), 1024, 1) == []  # 11008 = 10 x 1024 + 768
    assert check_multipruner(SMOL, (0.3, 0.6, 0.1), 1000, 1) == []
    problems = check_multipruner(SMOL, (0.3, 0.6, 0.1), 1536, 3)
    assert any("search.mlp_group 1536 must be between 1 and 1535" in p and "width - group > 0" in p for p in problems)
    assert any("search.head_group 3" in p and "GQA" in p for p in problems)
    assert any("summing to 1" in p for p in check_multipruner(SMOL, (0.5, 0.3, 0.1), 256, 1))


def test_dividing_group_is_the_nearest_divisor():
    assert dividing_group(LLAMA2_7B, 1024) == 688 and dividing_group(LLAMA3_8B, 1024) == 1024
    assert 11008 % dividing_group(LLAMA2_7B, 1000) == 0


def test_multipruners_ratio_keeps_the_norms_of_removed_blocks():
    mask = Mask(attn_removed={1, 2}, mlp_removed={3}, mlp_width={0: 768})
    gap = ratio(mask, LLAMA2_7B) - multipruner_ratio(mask, LLAMA2_7B)
    assert gap * 6_738_415_616 == pytest.approx(3 * 4096)
    assert multipruner_ratio(Mask(mlp_width={0: 768}), LLAMA2_7B) == ratio(Mask(mlp_width={0: 768}), LLAMA2_7B)
    assert stage_budgets((0.44, 0.52, 0.04), 0.22) == pytest.approx((0.0968, 0.2112, 0.22))
