"""Compact exports: sliced for real, loadable with stock classes, same logits as the masked model."""

from __future__ import annotations

import json

import pytest
import torch

from actors.export import export_compact, load_pruned
from actors.forward import LeanDecoder
from actors.surgery import count_parameters, reorder_by_l1_
from search_spaces import Mask, param_count
from search_spaces.pruning_config import mask_from_pruning_config
from tests.tiny import save_tiny, tiny_arch, tiny_model

MASKS = [
    Mask(attn_removed={0}, mlp_removed={2}),
    Mask(attn_removed={0, 3}, head_units={1: 1}, mlp_width={0: 16, 3: 32}),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {f: save_tiny(f, root / f) for f in ("llama", "qwen2", "mistral")}


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_export_equals_masked_model(family, mask, model_dirs, tmp_path):
    arch = tiny_arch(family)
    out = export_compact(model_dirs[family], mask, tmp_path / "compact")
    compact = load_pruned(out)
    assert count_parameters(compact) == param_count(mask, arch)
    assert json.loads((out / "pruning_config.json").read_text())["pruned_attn_idx"] == sorted(mask.attn_removed)
    ids = torch.randint(0, arch.vocab_size, (2, 30), generator=torch.Generator().manual_seed(9))
    reordered = reorder_by_l1_(tiny_model(family), arch)
    with torch.inference_mode():
        expected = LeanDecoder(reordered, arch).forward_logits(ids, mask)
        got = compact(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generate_with_first_attention_removed_uses_the_cache_right(model_dirs, tmp_path):
    arch = tiny_arch("llama")
    mask = MASKS[1]  # attention of layer 0 is gone: the KV cache of layer 0 still counts tokens
    compact = load_pruned(export_compact(model_dirs["llama"], mask, tmp_path / "compact"))
    prompt = torch.randint(2, arch.vocab_size, (1, 7), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        out = compact.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Reference: greedy decoding without any cache, one full forward per token.
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, compact(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == ids.tolist()
    with torch.inference_mode():  # callers that ask the cache how many tokens it has seen
        assert compact(prompt, use_cache=True).past_key_values.get_seq_length() == prompt.shape[1]


def test_pruning_config_round_trip_gives_the_same_model(model_dirs, tmp_path):
    arch = tiny_arch("qwen2")
    first = export_compact(model_dirs["qwen2"], MASKS[1], tmp_path / "a")
    mask = mask_from_pruning_config(json.loads((first / "pruning_config.json").read_text()), arch)
    second = export_compact(model_dirs["qwen2"], mask, tmp_path / "b")
    a, b = load_pruned(first).state_dict(), load_pruned(second).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loading_a_dense_directory_says_what_to_do(model_dirs):
    with pytest.raises(ValueError, match="not a rayprune export"):
        load_pruned(model_dirs["llama"])
