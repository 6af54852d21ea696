"""SPRINT's working memory: ``search_spaces.memory.sprint_memory`` is what ``actors/sprint.py`` keeps.

Measured, as tests/actors/test_memory_budget.py measures the engine: every tensor created during a
sequence of steps is seen at the dispatcher (a ``TorchDispatchMode``), and the peak of the bytes of
those alive at once is taken over streams of all windows (N, T, H) and the refits' kept branches (the
pieces ``StepWork._branch`` stores, per batch). Storages are counted once (views share them), host
copies of parked checkpoints (made while the count is paused) not at all. The sequence makes each of
a step's moments reach the figure's worst case: two steps fill the memo (no refits), then two steps
refit one candidate whose branch and window reference are new streams (MLP 1 with MLP 2 removed),
with the dense model's walk in the third step for ``refit_target: dense``; every step walks from the
embeddings. Last, the stores on a bf16 replica over two emulated GPUs placed by accelerate: each on
the device of the layer that made it, and the numbers of a CPU replica.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import actors.sprint
import actors.sprint_memo
from actors.forward import LeanDecoder
from actors.sprint import Checkpoints, run_step
from search_spaces import Mask
from search_spaces.latency import BlockCosts
from search_spaces.memory import sprint_memory, working_memory
from search_spaces.sprint import StepRequest, present_blocks
from tests.actors.test_devices_paths import checkpoints, own_cache  # noqa: F401 (fixtures)
from tests.emulation import emulate, emulated_model
from tests.tiny import tiny_arch, tiny_model

N, T, BATCH = 6, 20, 4  # windows, tokens, batch: a batch's streams (4 or 2 rows) are not the stores' (6)
#: (mask, refit target (None: the one tested), candidates, top_k) of each step; see the module docstring.
STEPS = [(Mask(attn_removed={0}), "local", [1], 0), (Mask(attn_removed={1}), "local", [1], 0),
         (Mask(mlp_removed={2}), None, [3], 1), (Mask(mlp_removed={2}, attn_removed={0}), None, [3], 1)]


class LiveStreams(TorchDispatchMode):
    """Peak bytes alive at once of the tensors created inside of shape (N, T, H) and of those
    :meth:`watch` is given, each storage once; nothing created while ``paused`` (host copies)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape, self.refs, self.peak, self.paused = (N, T, hidden), [], 0, False

    def watch(self, t: torch.Tensor) -> None:
        self.refs.append(weakref.ref(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.watch(t)
        alive = [t for t in (r() for r in self.refs) if t is not None]
        self.refs = [weakref.ref(t) for t in alive]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.peak = max(self.peak, sum(storages.values()))
        return out


def measured_peak(decoder, windows, memo, monkeypatch, refit_target: str, reference: str, every: int) -> int:
    """Peak bytes of stores over :data:`STEPS` (see the module docstring)."""
    live = LiveStreams(decoder.arch.hidden_size)
    branch, park = actors.sprint.StepWork._branch, actors.sprint_memo.Parked.__init__

    def kept_branch(self, s, b, rows):
        pair = branch(self, s, b, rows)
        if (s, b) in self._branches:  # stored for the re-scores: the refits' branches
            for t in pair:
                live.watch(t)
        return pair

    def parked(self, t):
        live.paused = True
        try:
            park(self, t)
        finally:
            live.paused = False

    monkeypatch.setattr(actors.sprint.StepWork, "_branch", kept_branch)
    monkeypatch.setattr(actors.sprint_memo.Parked, "__init__", parked)
    with live:
        for mask, target, candidates, top_k in STEPS:
            request = StepRequest("calibration", mask, (), tuple(candidates), (), BlockCosts(1.0, 1.0, 2.0),
                                  top_k=top_k, ridge=0.1, checkpoint_every=every, refit_target=target or refit_target,
                                  reference=reference)
            run_step(decoder, windows, BATCH, request, {}, memo)
    return live.peak


def _windows(arch):
    return torch.randint(0, arch.vocab_size, (N, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("max_states", [3, 1])  # 1: the dense state and the step's own take turns
@pytest.mark.parametrize("every", [1, 4])  # 4 checkpoints per state, or 1 (block 0)
@pytest.mark.parametrize("stores", [100, 4, 1])  # in streams of all windows: all fit, the branches only, none
@pytest.mark.parametrize("reference", ["window", "current"])
@pytest.mark.parametrize("refit_target", ["local", "dense"])
def test_the_estimate_is_the_peak_a_step_keeps(refit_target, reference, stores, every, max_states, monkeypatch):
    arch = tiny_arch("llama")
    stream = N * T * arch.hidden_size * 4  # one fp32 stream of all windows
    monkeypatch.setattr(actors.sprint, "STORE_BYTES", stores * stream)
    peak = measured_peak(LeanDecoder(tiny_model("llama"), arch), _windows(arch), Checkpoints(max_states), monkeypatch,
                         refit_target, reference, every)
    figure = sprint_memory(arch, windows=N, tokens=T, element_bytes=4, top_k=1, checkpoint_every=every,
                           max_states=max_states, store_bytes=stores * stream, refit_target=refit_target,
                           reference=reference)
    assert peak == figure.checkpoints + figure.step_streams
    if refit_target == "local" and stores == 100:  # no dense walk: less than the dense model's stores
        dense = sprint_memory(arch, windows=N, tokens=T, element_bytes=4, top_k=1, checkpoint_every=every,
                              max_states=max_states, store_bytes=stores * stream, refit_target="dense",
                              reference=reference)
        assert dense.checkpoints + dense.step_streams > peak


@pytest.mark.parametrize("refit_target", ["local", "dense"])
def test_on_emulated_gpus_a_budget_caps_the_memo_and_the_stores(refit_target, monkeypatch):
    """A budget of 5 streams: the memo parks the rest in host memory (not counted), the step keeps
    only its checkpoints and one refit's branches; the peak is the estimate's with that budget."""
    arch = tiny_arch("llama")
    stream = N * T * arch.hidden_size * 4
    with emulate():
        model, _ = emulated_model("llama", 2)
        decoder = LeanDecoder(model, arch)
        windows = _windows(arch).to(decoder.embed_tokens.weight.device)
        memo = Checkpoints(memory_budget=5 * stream)
        peak = measured_peak(decoder, windows, memo, monkeypatch, refit_target, "window", every=1)
        assert memo.parked() > 0
    figure = sprint_memory(arch, windows=N, tokens=T, element_bytes=4, top_k=1, checkpoint_every=1,
                           checkpoint_budget=5 * stream, refit_target=refit_target)
    assert figure.checkpoints == 5 * stream
    assert peak == figure.checkpoints + figure.step_streams


def test_working_memory_passes_the_settings_on():
    arch = tiny_arch("llama")
    common = dict(batch_size=BATCH, tokens=T, element_bytes=4, sprint=True, windows=N, top_k=1, store_bytes=1 << 30)
    for target in ("local", "dense"):
        for reference in ("window", "current"):
            w = working_memory(arch, **common, refit_target=target, reference=reference)
            assert w.sprint == sprint_memory(arch, windows=N, tokens=T, element_bytes=4, top_k=1,
                                             store_bytes=1 << 30, refit_target=target, reference=reference)
    with pytest.raises(ValueError, match="refit_target 'global' is not one of local, dense"):
        working_memory(arch, **common, refit_target="global")
    with pytest.raises(ValueError, match="reference 'dense' is not one of window, current"):
        working_memory(arch, **common, reference="dense")


# ---- the stores on a bf16 replica over two GPUs placed by accelerate ---------------------------------
@pytest.mark.parametrize("refit_target", ["local", "dense"])
def test_two_steps_on_a_bf16_replica_over_two_gpus_keep_each_stream_where_its_layer_left_it(checkpoints,
                                                                                         refit_target):
    """Two whole steps (``Evaluator.sprint_step``) on a bf16 replica over 2 emulated GPUs (layers 0-1 on
    cuda:0, 2-3 on cuda:1): the first from a mask with holes on both sides of the boundary (with the
    dense walk for ``dense``), the second from the first's checkpoints, its choice's refit carried and a
    remembered winner refitted again after the re-scores. The numbers of a bf16 CPU replica, and every
    stream the memo keeps lies on the device of the last block that ran before it."""
    from actors.evaluator import Evaluator
    from search_spaces import Block
    from search_spaces.sprint import refit_targets, rescore_after, state_key
    from tests.actors.test_devices_paths import LAYERS, MASKS, accelerate_map, emulated_gpus
    from tests.emulation import device_of

    path = checkpoints("llama", False)
    windows = {"calibration": np.random.default_rng(5).integers(0, tiny_arch("llama").vocab_size, size=(6, 20))}
    mask = MASKS[1]  # MLP 1 (cuda:0) and attention 2 (cuda:1) removed
    costs = BlockCosts(0.0, 0.1, 0.25)
    first = StepRequest("calibration", mask, candidates=(5, 6, 7), costs=costs, top_k=2,  # on cuda:1
                        ridge=0.1, checkpoint_every=1, refit_target=refit_target)

    def two_steps(evaluator):
        one = evaluator.sprint_step(first.to_dict(), {})
        choice = one["choice"]
        after = mask.remove(Block.from_index(choice["block"]))
        tuned, sources = (), {}
        if choice["weight"] is not None:
            tuned, sources = ((choice["target"] // 2, choice["sha"]),), {choice["sha"]: choice["weight"]}
        rescore = [s for s in rescore_after(after, LAYERS, choice["block"]) if s >= 4]  # a walk from block 4
        known = tuple((s, one["sensitivity"][s]) for s in one["sensitivity"] if s in present_blocks(after, LAYERS)
                      and s not in rescore)
        winner = next(s for s in sorted({*rescore, *dict(known)}) if refit_targets(after, LAYERS, [s]))
        second = StepRequest("calibration", after, tuned, tuple(rescore), known, costs, top_k=1, ridge=0.1,
                             checkpoint_every=1, parent=one["state"], unchanged_before=choice["block"],
                             refit_target=refit_target, remembered=((winner, 0.0),))
        two = evaluator.sprint_step(second.to_dict(), sources)
        assert two["walk_start"] > 0 and two["choice"]["block"] == winner and two["choice"]["status"] == "ok"
        states = {state_key(mask, ()): mask, state_key(after, tuned): after, state_key(Mask(), ()): Mask()}
        return one, two, states

    kwargs = dict(model=path, windows=windows, batch_size=4, dtype="bfloat16")
    expected = two_steps(Evaluator(**kwargs, device_map=None))
    with emulated_gpus(2):
        replica = Evaluator(**kwargs, device_map=accelerate_map(2, False))
        got = two_steps(replica)
        kept = {key: streams for (_, key), streams in replica._sprint_memo._states.items()}
        layer_device = {b: device_of(replica.model.model.layers[b // 2].mlp.down_proj.weight) for b in range(8)}
        homes = {key: {c: device_of(t) for c, t in streams.items()} for key, streams in kept.items()}
    assert (state_key(Mask(), ()) in kept) == (refit_target == "dense")  # the dense walk's state
    for key, streams in homes.items():
        state = got[2][key]
        for c, home in streams.items():
            ran = [b for b in range(c) if not state.removed(Block.from_index(b))]
            assert home == (layer_device[ran[-1]] if ran else "cuda:0"), (key, c)
    assert {home for streams in homes.values() for home in streams.values()} == {"cuda:0", "cuda:1"}
    for g, e in zip(got[:2], expected[:2]):
        assert g["tokens"] == e["tokens"] and g["nll_sum"] == pytest.approx(e["nll_sum"], rel=1e-5)
        assert g["sensitivity"].keys() == e["sensitivity"].keys()
        for s, value in e["sensitivity"].items():
            assert g["sensitivity"][s] == pytest.approx(value, rel=1e-4, abs=1e-6), s
        assert g["choice"]["block"] == e["choice"]["block"]
        np.testing.assert_allclose(g["choice"]["weight"], e["choice"]["weight"], rtol=1e-3, atol=1e-4)
