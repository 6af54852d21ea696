"""Qwen2's per-layer sliding window on a replica over emulated GPUs (tests/emulation.py), in bf16.

With 2 devices, layers 0-1 (full attention) sit on cuda:0 and layers 2-3 (sliding, at or past
``max_window_layers``) on cuda:1: the window's band mask is built where each layer runs. The masked
forward, its NLL and the engine's scores equal the single-device CPU numbers; the harness raises on
any device mixing.
"""

from __future__ import annotations

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from search_spaces import Arch, Mask
from tests.emulation import device_map, device_of, emulate, place
from tests.tiny import COMMON

WINDOW = dict(use_sliding_window=True, sliding_window=6, max_window_layers=2)
MASKS = [Mask(), Mask(mlp_removed={1}, attn_removed={2}), Mask(head_units={2: 1, 0: 1}, mlp_width={3: 16})]


def _model(dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(6)
    config = AutoConfig.for_model("qwen2", **COMMON, **WINDOW)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype), Arch.from_hf_config(config.to_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2])
def test_sliding_layers_on_emulated_gpus_give_the_cpu_numbers(n, dtype):
    reference, arch = _model(dtype)
    ids = torch.randint(0, arch.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))  # 20 > window
    with torch.inference_mode():
        lean = LeanDecoder(reference, arch)
        assert lean.windows == [None, None, 6, 6]
        expected = [(lean.forward_logits(ids, m), lean.nll(lean.run(lean.embed(ids), m), ids)) for m in MASKS]
        scores = Engine(LeanDecoder(reference, arch), batch_size=2).score_masks(ids, MASKS, Mask())
    with emulate(), torch.inference_mode():
        model, _ = _model(dtype)
        decoder = LeanDecoder(place(model, device_map(model, n)), arch)
        on_gpu = ids.to(decoder.embed_tokens.weight.device)
        for mask, (logits, (nll, tokens)) in zip(MASKS, expected):
            got = decoder.forward_logits(on_gpu, mask)
            assert device_of(got) == device_of(decoder.lm_head.weight)
            torch.testing.assert_close(got.cpu(), logits, rtol=0, atol=0)  # same ops, same order: bit-equal
            got_nll, got_tokens = decoder.nll(decoder.run(decoder.embed(on_gpu), mask), on_gpu)
            assert got_tokens == tokens and got_nll == pytest.approx(nll, rel=1e-6)
        got_scores = Engine(decoder, batch_size=2).score_masks(on_gpu, MASKS, Mask())
    assert [s.tokens for s in got_scores] == [s.tokens for s in scores]
    assert [s.nll_sum for s in got_scores] == pytest.approx([s.nll_sum for s in scores], rel=1e-6)
