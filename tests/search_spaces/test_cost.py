"""Parameter arithmetic against published figures and against itself."""

from __future__ import annotations

import pytest

from search_spaces import Arch, Block, Mask, dense_params, param_count, ratio
from search_spaces.pruning_config import mask_from_pruning_config, mask_to_pruning_config

LLAMA2_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}
SMOLLM2 = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}


def test_dense_counts_match_published_models():
    assert dense_params(Arch.from_hf_config(LLAMA2_7B)) == 6_738_415_616
    assert dense_params(Arch.from_hf_config(SMOLLM2)) == 134_515_008


def test_removing_every_block_leaves_embeddings_only():
    arch = Arch.from_hf_config(SMOLLM2)
    everything = Mask(frozenset(range(30)), frozenset(range(30)))
    assert param_count(everything, arch) == 49152 * 576 + 576
    assert 0.78 < ratio(everything, arch) < 0.8


def test_norm_convention_differs_by_hidden_size_per_removed_block():
    arch = Arch.from_hf_config(LLAMA2_7B)
    mask = Mask(frozenset({24, 25, 27}), frozenset({8}))
    assert param_count(mask, arch, count_removed_norms=True) - param_count(mask, arch) == 4 * 4096


def test_blocks_removed_one_by_one_add_up():
    arch = Arch.from_hf_config(SMOLLM2)
    mask, previous = Mask(), dense_params(arch)
    for index in (5, 8, 13, 40):
        mask = mask.remove(Block.from_index(index))
        now = param_count(mask, arch)
        expected = 884_736 + 576 if index % 2 == 0 else 2_654_208 + 576
        assert previous - now == expected
        previous = now


def test_pruning_config_round_trip_and_errors():
    arch = Arch.from_hf_config(SMOLLM2)
    mask = Mask(frozenset({3}), frozenset({7}), ((1, 2),), ((2, 1024),))
    data = mask_to_pruning_config(mask, arch)
    assert data["pruned_attn_width"] == {"1": 2 * 3 * 64}
    assert mask_from_pruning_config(data, arch) == mask
    with pytest.raises(ValueError) as err:
        mask_from_pruning_config({"pruned_attn_idx": [31], "pruned_attn_width": {"2": 100}, "oops": 1}, arch)
    text = str(err.value)
    assert "layer 31" in text and "pruned_attn_width[2]=100" in text and "'oops'" in text


def test_unsupported_family_names_supported_ones():
    from search_spaces import UnsupportedArchitecture

    with pytest.raises(UnsupportedArchitecture, match="llama, mistral, qwen2"):
        Arch.from_hf_config({**SMOLLM2, "model_type": "gpt2"})
