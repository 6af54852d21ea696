"""The engine's working-memory budget (actors/memory.py): micro-batches keep the hidden states under
it and change no score.

What "no score changes" means here, honestly: a micro-batch's residual streams are the same numbers
as the full batch's rows (bit for bit on these CPUs), but ``LeanDecoder.nll`` sums the token losses of
a chunk in fp32 before adding chunks in fp64, so regrouping the tokens into other chunks reassociates
an fp32 sum: measured up to 1.2e-7 relative on the tiny models. The tests allow 1e-6 and require
identical token counts.
"""

from __future__ import annotations

import logging
import threading
import weakref
from types import SimpleNamespace

import pytest
import torch

from actors import memory
from actors.engine import Engine
from actors.forward import LeanDecoder
from actors.memory import (DEFAULT_FRACTION, default_budget, engine_bytes_per_sample, micro_batch_size,
                           resolve_budget, tensor_bytes, weight_bytes)
from search_spaces import Block, Mask
from tests.emulation import emulate, emulated_model, tiny_twin
from tests.tiny import tiny_arch, tiny_model

REL = 1e-6  # fp32 reassociation of the loss chunks (see the module docstring)


def _windows(arch, n=5, t=30, seed=0):
    return torch.randint(0, arch.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _candidates(arch, base: Mask) -> list[Mask]:
    masks = [base.remove(b) for b in map(Block.from_index, range(arch.num_blocks)) if not base.removed(b)]
    return masks + [base.with_mlp_width(1, 24), base.with_heads(3, 1), base]


def _same(got, expected):
    for g, e in zip(got, expected, strict=True):
        assert g.tokens == e.tokens and g.nll_sum == pytest.approx(e.nll_sum, rel=REL)


# ---- the budget -------------------------------------------------------------------------------------
def test_no_default_limit_on_a_cpu_and_an_explicit_budget_overrides():
    model = tiny_model("llama")
    assert default_budget(model) is None and resolve_budget(None, model) is None
    assert resolve_budget(123, model) == 123
    with pytest.raises(ValueError, match="positive number of bytes"):
        resolve_budget(0, model)
    engine = Engine(LeanDecoder(model, tiny_arch("llama")), batch_size=4)
    assert engine.memory_budget is None and engine.micro_batch_size(2048, kept=9, runs=9) == 4


@pytest.mark.parametrize("n,tied", [(1, False), (2, False), (2, True)])
def test_default_budget_on_gpus_is_a_share_of_what_the_weights_leave(monkeypatch, n, tied):
    """The CUDA path, on emulated GPUs whose reported total memory is 1 MiB each."""
    total = 1 << 20
    asked = []

    def properties(device):
        asked.append(str(device))
        return SimpleNamespace(total_memory=total)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    with emulate():
        model, arch = emulated_model("llama", n, tied=tied)
        weights = weight_bytes(model)
        budget = default_budget(model)
        engine = Engine(LeanDecoder(model, arch))
    params = {id(p): p for p in [*tiny_twin("llama", tied).parameters(), *tiny_twin("llama", tied).buffers()]}
    assert weights == sum(tensor_bytes(p) for p in params.values())  # tied weights counted once
    assert sorted(asked) == sorted([f"cuda:{i}" for i in range(n)] * 2)  # once per engine, once here
    assert budget == int((n * total - weights) * DEFAULT_FRACTION) and engine.memory_budget == budget


def test_micro_batch_size(caplog):
    assert micro_batch_size(None, 10**12, 4) == 4
    assert micro_batch_size(40, 10, 4) == 4 and micro_batch_size(39, 10, 4) == 3 and micro_batch_size(10, 10, 4) == 1
    memory._warned.discard("test")
    with caplog.at_level(logging.WARNING, logger="actors.memory"):
        assert micro_batch_size(5, 10, 4, what="test") == 1  # one sample over the budget still runs
        assert micro_batch_size(5, 10, 4, what="test") == 1
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "over the budget" in caplog.records[0].message


def test_bytes_per_sample_counts_kept_streams_in_flight_streams_and_mlp_temporaries():
    arch = tiny_arch("llama")  # H 32, I 48
    assert engine_bytes_per_sample(arch, 10, 4, kept=9, concurrent=1) == 10 * 4 * (9 * 32 + 2 * 32 + 3 * 48)
    assert engine_bytes_per_sample(arch, 10, 2, kept=1, concurrent=2) == 10 * 2 * (32 + 2 * (2 * 32 + 3 * 48))


# ---- micro-batches change no score ------------------------------------------------------------------
@pytest.mark.parametrize("base", [None, Mask(), Mask(attn_removed={2}, mlp_removed={0}, mlp_width={3: 24})],
                         ids=["full", "prefix-dense", "prefix-pruned"])
@pytest.mark.parametrize("streams", [1, 2])
def test_micro_batches_of_one_give_the_same_scores(family, base, streams):
    arch = tiny_arch(family)
    model = tiny_model(family)
    windows = _windows(arch)
    masks = _candidates(arch, base or Mask())
    expected = Engine(LeanDecoder(model, arch), batch_size=4, streams=streams).score_masks(windows, masks, base)
    tiny = Engine(LeanDecoder(model, arch), batch_size=4, streams=streams, memory_budget=1)
    assert tiny.micro_batch_size(30, kept=9, runs=len(masks)) == 1
    _same(tiny.score_masks(windows, masks, base), expected)


def test_a_budget_that_fits_the_batch_changes_nothing_at_all():
    arch = tiny_arch("qwen2")
    model = tiny_model("qwen2")
    windows, masks = _windows(arch), _candidates(arch, Mask())
    plain = Engine(LeanDecoder(model, arch), batch_size=4).score_masks(windows, masks, Mask())
    roomy = Engine(LeanDecoder(model, arch), batch_size=4, memory_budget=1 << 30).score_masks(windows, masks, Mask())
    assert [(s.nll_sum, s.tokens) for s in roomy] == [(s.nll_sum, s.tokens) for s in plain]  # the same code path


@pytest.mark.parametrize("n,tied", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("base,streams", [(Mask(), 1), (None, 1), (Mask(mlp_removed={1}), 2)],
                         ids=["prefix", "full", "prefix-2streams"])
def test_micro_batches_on_emulated_gpus(family, n, tied, base, streams):
    arch = tiny_arch(family)
    windows = _windows(arch, seed=1)
    masks = [Mask(), Mask(attn_removed={2}), Mask(mlp_removed={1}), Mask(mlp_removed={1}, attn_removed={2}),
             Mask(attn_removed={0}, mlp_removed={3}, head_units={2: 1}, mlp_width={1: 24}),
             Mask(attn_removed={2, 3}, mlp_removed={2, 3})]
    expected = Engine(LeanDecoder(tiny_twin(family, tied), arch), batch_size=2).score_masks(windows, masks, base)
    with emulate():
        model, _ = emulated_model(family, n, tied=tied)
        engine = Engine(LeanDecoder(model, arch), batch_size=2, streams=streams, memory_budget=1)
        got = engine.score_masks(windows.to(model.model.embed_tokens.weight.device), masks, base)
    _same(got, expected)


# ---- the kept hidden states stay under the budget (measured) ----------------------------------------
class MeasuredDecoder(LeanDecoder):
    """Records the peak bytes of residual streams (outputs of ``embed`` and ``block``) alive at once,
    and the batch sizes it embeds (one per micro-batch)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._live: list[weakref.ref] = []
        self._lock = threading.Lock()
        self.peak, self.batches = 0, []

    def _track(self, h: torch.Tensor) -> torch.Tensor:
        with self._lock:
            live = [t for t in (r() for r in self._live) if t is not None]
            if not any(t is h for t in live):
                live.append(h)
            self._live = [weakref.ref(t) for t in live]
            self.peak = max(self.peak, sum(tensor_bytes(t) for t in live))
        return h

    def embed(self, input_ids):
        self.batches.append(input_ids.shape[0])
        return self._track(super().embed(input_ids))

    def block(self, index, h, mask, rope):
        return self._track(super().block(index, h, mask, rope))


@pytest.mark.parametrize("streams", [1, 2])
def test_peak_kept_hidden_bytes_stay_under_the_budget(streams):
    arch = tiny_arch("llama")
    model = tiny_model("llama")
    windows, masks = _windows(arch, n=8, t=30), _candidates(arch, Mask())
    kept, concurrent = arch.num_blocks + 1, streams  # a stream entering every block, and the end
    per_sample = engine_bytes_per_sample(arch, 30, 4, kept, concurrent)
    budget = 2 * per_sample + per_sample // 2  # two samples fit, three do not

    unbounded = MeasuredDecoder(model, arch)
    expected = Engine(unbounded, batch_size=8, streams=streams).score_masks(windows, masks, Mask())
    bounded = MeasuredDecoder(model, arch)
    got = Engine(bounded, batch_size=8, streams=streams, memory_budget=budget).score_masks(windows, masks, Mask())

    _same(got, expected)
    assert unbounded.batches == [8] and bounded.batches == [2, 2, 2, 2]
    assert unbounded.peak > budget  # without the budget the same work keeps more: the test can fail
    assert bounded.peak <= budget
    # The count of streams behind the budget is an upper bound of what really is alive at once.
    assert bounded.peak <= 2 * 30 * arch.hidden_size * 4 * (kept + 2 * concurrent)
    assert unbounded.peak >= 8 * 30 * arch.hidden_size * 4 * kept  # and it is what prefix reuse keeps


@pytest.mark.parametrize("tied", [False, True])
def test_micro_batches_of_a_bf16_replica_on_two_emulated_gpus(tied):
    """As a GPU user runs it: bf16 weights over 2 GPUs, a budget forcing micro-batches of one sample.
    The same token counts, and the whole-batch CPU run's NLL sums (a sample's bf16 hidden states do not
    depend on its micro-batch; only the fp32 loss chunks regroup: 1e-7 here)."""
    from tests.emulation import device_map, place

    arch = tiny_arch("llama")
    windows = _windows(arch, seed=2)
    masks = [Mask(), Mask(attn_removed={2}), Mask(mlp_removed={1}, mlp_width={3: 24}, head_units={0: 1})]
    expected = Engine(LeanDecoder(tiny_twin("llama", tied).to(torch.bfloat16), arch), batch_size=4)
    expected = expected.score_masks(windows, masks, Mask())
    with emulate():
        model = tiny_twin("llama", tied).to(torch.bfloat16)
        model = place(model, device_map(model, 2))
        engine = Engine(LeanDecoder(model, arch), batch_size=4, memory_budget=1)
        assert engine.micro_batch_size(windows.shape[1], 3, len(masks)) == 1
        got = engine.score_masks(windows.to(model.model.embed_tokens.weight.device), masks, Mask())
    for g, e in zip(got, expected, strict=True):
        assert g.tokens == e.tokens and g.nll_sum == pytest.approx(e.nll_sum, rel=1e-6)
