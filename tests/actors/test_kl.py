"""KL fitness: KL(dense || masked) per token as defined, its top-K coarsening, through the engine
and the evaluator (shards add up, the dense model scores 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actors.engine import Engine
from actors.evaluator import Evaluator
from actors.forward import LeanDecoder
from actors.kl import DenseReference, kl_sum
from search_spaces import Mask
from tests.tiny import save_tiny, tiny_arch, tiny_model

MASK = Mask(attn_removed={1}, mlp_removed={2})


@pytest.fixture
def setup(family):
    arch = tiny_arch(family)
    decoder = LeanDecoder(tiny_model(family), arch)
    windows = torch.randint(0, arch.vocab_size, (6, 20), generator=torch.Generator().manual_seed(2))
    return arch, decoder, windows


def naive_kl(decoder, windows, mask) -> float:
    """KL(dense || masked) summed over every predicted position, from two full forwards."""
    with torch.inference_mode():
        p = F.log_softmax(decoder.forward_logits(windows, Mask())[:, :-1].float(), dim=-1)
        q = F.log_softmax(decoder.forward_logits(windows, mask)[:, :-1].float(), dim=-1)
    return float((p.exp() * (p - q)).sum(dtype=torch.float64))


def test_kl_is_the_definition_and_zero_for_the_dense_model(setup):
    arch, decoder, windows = setup
    reference = DenseReference.compute(decoder, windows, batch_size=4)
    assert reference.logp.shape == (6, 19, arch.vocab_size) and reference.top_k is None
    with torch.inference_mode():
        dense, n = kl_sum(decoder, decoder.run(decoder.embed(windows), Mask()), reference)
        masked, _ = kl_sum(decoder, decoder.run(decoder.embed(windows), MASK), reference)
    assert n == 6 * 19 and abs(dense) < 1e-6
    assert masked == pytest.approx(naive_kl(decoder, windows, MASK), rel=1e-5) and masked > 0


def test_top_k_folds_the_rest_and_never_exceeds_the_exact_kl(setup):
    arch, decoder, windows = setup
    h = None
    with torch.inference_mode():
        h = decoder.run(decoder.embed(windows), MASK)
        exact, _ = kl_sum(decoder, h, DenseReference.compute(decoder, windows, 4))
        folded = {k: kl_sum(decoder, h, DenseReference.compute(decoder, windows, 4, top_k=k))[0]
                  for k in (1, 8, arch.vocab_size)}
    assert all(0 <= v <= exact + 1e-9 for v in folded.values())  # coarsening never increases a KL
    assert folded[arch.vocab_size] == pytest.approx(exact, rel=1e-6)  # K = V: nothing folded
    assert folded[1] <= folded[8] + 1e-9  # a finer partition keeps more of it
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        DenseReference.compute(decoder, windows, 4, top_k=0)


def test_the_engine_scores_kl_with_prefix_reuse_and_micro_batches(setup):
    arch, decoder, windows = setup
    reference = DenseReference.compute(decoder, windows, 4)

    def loss(h, batch, at):
        return kl_sum(decoder, h, reference.rows(at, at + batch.shape[0]))

    masks = [Mask(), MASK, Mask(mlp_removed={3})]
    engine = Engine(decoder, batch_size=4)
    shared = engine.score_masks(windows, masks, Mask(), loss)
    small = Engine(decoder, batch_size=4, memory_budget=1).score_masks(windows, masks, Mask(), loss)  # micro-batches
    for mask, a, b in zip(masks, shared, small):
        assert a.tokens == b.tokens == 6 * 19
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6, abs=1e-7)
        assert a.nll_sum == pytest.approx(naive_kl(decoder, windows, mask), rel=1e-5, abs=1e-6)


def test_the_evaluator_scores_kl_per_shard_and_the_shards_add_up(tmp_path):
    path = save_tiny("llama", tmp_path / "model")
    windows = np.random.default_rng(0).integers(0, 97, size=(8, 16))
    evaluator = Evaluator(path, {"calibration": windows}, batch_size=2)
    masks = [Mask().to_json(), MASK.to_json()]
    whole = evaluator.evaluate("calibration", masks, Mask().to_json(), fitness="kl")
    halves = [evaluator.evaluate("calibration", masks, Mask().to_json(), rows, fitness="kl") for rows in ((0, 4), (4, 8))]
    assert abs(whole[0]["nll_sum"]) < 1e-6 and whole[1]["nll_sum"] > 0  # the dense model is its own reference
    for i in range(2):
        assert sum(h[i]["nll_sum"] for h in halves) == pytest.approx(whole[i]["nll_sum"], rel=1e-9, abs=1e-9)
        assert sum(h[i]["tokens"] for h in halves) == whole[i]["tokens"] == 8 * 15
    top = evaluator.evaluate("calibration", masks[1:], None, fitness="kl:4")
    assert 0 < top[0]["nll_sum"] <= whole[1]["nll_sum"] + 1e-9
    ppl = evaluator.evaluate("calibration", masks[1:], None)
    assert ppl[0]["nll_sum"] != top[0]["nll_sum"]
