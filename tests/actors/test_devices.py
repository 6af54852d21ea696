"""Device-correctness of the actor paths on emulated multi-GPU replicas (tests/emulation.py).

Each test runs a path on a tiny model placed over 1 or 2 emulated GPUs (accelerate-style: a tied LM
head on the embedding's device, the final norm and rotary embedding on the last one), asserts that
no operation mixes devices (the harness raises if one does) and that the numbers equal the plain
single-device CPU result.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.engine import Engine
from actors.forward import LeanDecoder
from actors.heldout import heldout_score
from actors.sprint import Checkpoints, run_step
from actors.surgery import prune_model_
from tests.tiny import reorder_by_l1_
from search_spaces import Block, Mask
from search_spaces.latency import BlockCosts
from search_spaces.sprint import StepRequest, present_blocks
from tests.emulation import device_of, emulate, emulated_model, mixes, tiny_twin
from tests.tiny import tiny_arch

# Layers 0-1 sit on cuda:0 and 2-3 on cuda:1 with 2 devices: block 3 (MLP 1) is the last block of
# cuda:0, block 4 (attention 2) the first of cuda:1.
MASKS = [
    Mask(),
    Mask(attn_removed={2}),  # removed block at the start of cuda:1
    Mask(mlp_removed={1}),  # removed block at the end of cuda:0
    Mask(mlp_removed={1}, attn_removed={2}),  # both sides of the boundary
    Mask(attn_removed={0}, mlp_removed={3}, head_units={2: 1}, mlp_width={1: 24}),
    Mask(attn_removed={2, 3}, mlp_removed={2, 3}),  # all of cuda:1 removed
]
LAYOUTS = [pytest.param(n, tied, id=f"{n}dev-{'tied' if tied else 'untied'}") for n in (1, 2) for tied in (False, True)]


def _windows(arch, n=5, t=30, seed=0):
    return torch.randint(0, arch.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_decoder(family, tied):
    arch = tiny_arch(family)
    return LeanDecoder(reorder_by_l1_(tiny_twin(family, tied), arch), arch)


def _emulated_decoder(family, n, tied):
    model, arch = emulated_model(family, n, tied=tied)
    return LeanDecoder(reorder_by_l1_(model, arch), arch)


def _on_embedding_device(decoder, windows):
    """Windows where the replica keeps them (actors/evaluator.py: on the embedding's device)."""
    return windows.to(decoder.embed_tokens.weight.device)


# ---- the harness catches planted mixes --------------------------------------------------------------
def test_harness_catches_a_planted_mix():
    with emulate():
        a, b = torch.ones(4).to("cuda:0"), torch.ones(4).cuda(1)
        assert str(a.device) == "cuda:0" and str(b.device) == "cuda:1" and a.is_cuda
        with mixes():
            a + b
        with mixes():
            torch.cat([a, b])
        with mixes():  # an index tensor on the CPU indexing a cuda:0 tensor
            a[torch.tensor([0, 2])]
        with mixes():
            torch.index_select(a, 0, torch.tensor([0, 2]))
        with mixes():  # a non-scalar CPU tensor
            a * torch.ones(4)
        weight = torch.nn.Parameter(torch.ones(3, 4)).to("cuda:1")
        with mixes():  # parameters count too
            F.linear(a, weight)
        # what may mix: a 0-dim CPU tensor, Python scalars; explicit moves
        assert device_of(a + torch.tensor(2.0)) == "cuda:0" and device_of(a * 3) == "cuda:0"
        assert device_of(a[torch.tensor([0, 2]).to(a.device)]) == "cuda:0"
        assert device_of(F.linear(a.to(weight.device), weight)) == "cuda:1"
        assert device_of(torch.arange(4, device=a.device) + a) == "cuda:0"
        assert device_of(a.to(b)) == "cuda:1" and device_of(a.cpu()) == "cpu" and device_of(a[1:]) == "cuda:0"
        assert device_of(a.to(torch.float64)) == "cuda:0" and device_of(a.double()[None].mT.contiguous()) == "cuda:0"
        with pytest.raises(TypeError, match="numpy"):
            a.numpy()
        with ThreadPoolExecutor(2) as pool:  # worker threads (Engine streams) are emulated too
            assert str(pool.submit(lambda: a.device).result()) == "cuda:0"
            with mixes():
                pool.submit(lambda: a + b).result()


def test_placement_follows_accelerate():
    with emulate():
        untied, _ = emulated_model("llama", 2, tied=False)
        tied, _ = emulated_model("llama", 2, tied=True)
        for model in (untied, tied):
            assert device_of(model.model.embed_tokens.weight) == "cuda:0"
            assert [device_of(layer.mlp.down_proj.weight) for layer in model.model.layers] == ["cuda:0"] * 2 + ["cuda:1"] * 2
            assert device_of(model.model.norm.weight) == "cuda:1"
        assert device_of(untied.lm_head.weight) == "cuda:1" and device_of(tied.lm_head.weight) == "cuda:0"


# ---- finding 1: reorder_by_l1_ while loading ------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
def test_reorder_by_l1_on_a_multi_gpu_replica(family, n):
    arch = tiny_arch(family)
    expected = reorder_by_l1_(tiny_twin(family), arch).state_dict()
    with emulate():
        model, _ = emulated_model(family, n)
        reorder_by_l1_(model, arch)
        devices = {name: device_of(t) for name, t in model.state_dict().items()}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert devices["model.layers.3.self_attn.q_proj.weight"] == f"cuda:{n - 1}"


# ---- the masked forward ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_lean_decoder_logits_and_nll(family, n, tied):
    reference = _reference_decoder(family, tied)
    windows = _windows(reference.arch)
    with torch.inference_mode():
        expected = [(reference.forward_logits(windows, m), reference.nll(reference.run(reference.embed(windows), m), windows))
                    for m in MASKS]
    with emulate(), torch.inference_mode():
        decoder = _emulated_decoder(family, n, tied)
        ids = _on_embedding_device(decoder, windows)
        for mask, (logits, (nll, tokens)) in zip(MASKS, expected):
            got = decoder.forward_logits(ids, mask)
            assert device_of(got) == device_of(decoder.lm_head.weight)
            assert torch.allclose(got.cpu(), logits, rtol=1e-5, atol=1e-6), mask
            got_nll, got_tokens = decoder.nll(decoder.run(decoder.embed(ids), mask), ids)
            assert got_tokens == tokens and got_nll == pytest.approx(nll, rel=1e-5), mask


# ---- the engine: prefix reuse, full runs, concurrent streams ---------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
@pytest.mark.parametrize("base,streams", [(Mask(), 1), (None, 1), (Mask(mlp_removed={1}), 2)],
                         ids=["prefix", "full", "prefix-2streams"])
def test_engine_score_masks(family, n, tied, base, streams):
    reference = _reference_decoder(family, tied)
    windows = _windows(reference.arch, seed=1)
    masks = MASKS + [m.remove(Block(1, "mlp")) for m in MASKS[:2]]
    expected = Engine(reference, batch_size=2).score_masks_naive(windows, masks)
    with emulate():
        engine = Engine(_emulated_decoder(family, n, tied), batch_size=2, streams=streams)
        got = engine.score_masks(_on_embedding_device(engine.decoder, windows), masks, base=base)
    for mask, g, e in zip(masks, got, expected):
        assert g.tokens == e.tokens and g.nll_sum == pytest.approx(e.nll_sum, rel=1e-5), mask


# ---- held-out perplexity with the stock forward ----------------------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_heldout_score(family, n, tied):
    arch = tiny_arch(family)
    windows = _windows(arch, n=3, t=40, seed=2).numpy()
    expected = heldout_score(reorder_by_l1_(tiny_twin(family, tied), arch), windows, batch_size=2)
    with emulate():
        model, _ = emulated_model(family, n, tied=tied)
        got = heldout_score(reorder_by_l1_(model, arch), windows, batch_size=2)
    assert got.tokens == expected.tokens and got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-5)


@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_physically_pruned_replica(family, n, tied):
    """prune_model_ (surgery: removed blocks, narrowed projections) on a placed replica, then the
    stock forward: the boundary blocks removed, layers on both devices narrowed."""
    arch = tiny_arch(family)
    mask = Mask(mlp_removed={1}, attn_removed={2}, head_units={0: 1, 3: 1}, mlp_width={2: 24})
    windows = _windows(arch, n=3, t=40, seed=5).numpy()
    expected = heldout_score(prune_model_(reorder_by_l1_(tiny_twin(family, tied), arch), mask, arch), windows)
    with emulate():
        model, _ = emulated_model(family, n, tied=tied)
        pruned = prune_model_(reorder_by_l1_(model, arch), mask, arch)
        assert device_of(pruned.model.layers[3].self_attn.q_proj.weight) == f"cuda:{n - 1}"
        got = heldout_score(pruned, windows)
    assert got.tokens == expected.tokens and got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-5)


# ---- one SPRINT step with refits ---------------------------------------------------------------------
COSTS = BlockCosts(1.0, 1.0, 2.0)


def _sprint(decoder, windows, mask, top_k, weights=None, tuned=()):
    request = StepRequest("calibration", mask, tuned, tuple(present_blocks(mask, decoder.arch.num_layers)), (), COSTS,
                          top_k=top_k, ridge=0.1, checkpoint_every=1, parent=None, unchanged_before=0)
    return run_step(decoder, windows, 4, request, weights or {}, Checkpoints())


def _same_step(got, expected):
    assert got["tokens"] == expected["tokens"] and got["nll_sum"] == pytest.approx(expected["nll_sum"], rel=1e-5)
    assert got["sensitivity"].keys() == expected["sensitivity"].keys()
    for s, value in expected["sensitivity"].items():
        assert got["sensitivity"][s] == pytest.approx(value, rel=1e-5, abs=1e-7), s
    assert [t["block"] for t in got["tuned"]] == [t["block"] for t in expected["tuned"]]
    for g, e in zip(got["tuned"], expected["tuned"]):
        assert g["status"] == e["status"] and g["sensitivity"] == pytest.approx(e["sensitivity"], rel=1e-4, abs=1e-7)
    if expected["choice"]["weight"] is not None:
        assert np.allclose(got["choice"]["weight"], expected["choice"]["weight"], rtol=1e-4, atol=1e-6)


# Mask(attn_removed={3}): candidate block 4 (attention 2, first block of cuda:1) has target block 5.
# Mask(mlp_removed={1}): candidate 2 (attention 1 on cuda:0) has target 5 on cuda:1, so the refit
# branch that skips it reaches the target with a stream still on cuda:0.
# Mask(mlp_removed={2, 3}, attn_removed={3}): candidate 4 is the only block left on cuda:1 and its
# target is the (removed) last block: the branch that skips it ends on cuda:0, the kept stream on cuda:1.
@pytest.mark.parametrize("n,tied", [pytest.param(2, False, id="2dev-untied"), pytest.param(2, True, id="2dev-tied"),
                                    pytest.param(1, False, id="1dev-untied")])
@pytest.mark.parametrize("mask", [Mask(), Mask(mlp_removed={1}), Mask(mlp_removed={1}, attn_removed={3}),
                                  Mask(mlp_removed={2, 3}, attn_removed={3})], ids=str)
def test_sprint_step_with_refits(family, n, tied, mask):
    reference = _reference_decoder(family, tied)
    windows = _windows(reference.arch, n=6, t=20, seed=3)
    weight = reference.layers[3].mlp.down_proj.weight.detach().clone() * 1.01
    tuned = ((3, "w3"),)
    expected = _sprint(reference, windows, mask, top_k=8, weights={"w3": weight}, tuned=tuned)
    assert any(t["status"] == "ok" for t in expected["tuned"])  # the refit really ran
    with emulate():
        decoder = _emulated_decoder(family, n, tied)
        got = _sprint(decoder, _on_embedding_device(decoder, windows), mask, top_k=8, weights={"w3": weight}, tuned=tuned)
    _same_step(got, expected)
