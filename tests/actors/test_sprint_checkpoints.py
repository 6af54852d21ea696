"""SPRINT's checkpoints under a memory budget: parked in host memory beyond it, brought back to their
device when used, and the step's numbers unchanged (on emulated GPUs, tests/emulation.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.forward import LeanDecoder
from actors.memory import tensor_bytes
from actors.sprint import Checkpoints, Parked, run_step
from search_spaces import Block, Mask
from search_spaces.latency import BlockCosts
from search_spaces.sprint import StepRequest, present_blocks, rescore_after
from tests.emulation import device_of, emulate, emulated_model, tiny_twin
from tests.tiny import tiny_arch

COSTS = BlockCosts(1.0, 1.0, 2.0)


def _windows(arch, n=6, t=20, seed=3):
    return torch.randint(0, arch.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _step(decoder, windows, mask, memo, *, candidates=None, known=(), tuned=(), weights=None, parent=None,
          unchanged_before=0, every=1, refit_target="local"):
    candidates = present_blocks(mask, decoder.arch.num_layers) if candidates is None else candidates
    request = StepRequest("calibration", mask, tuned, tuple(candidates), tuple(known), COSTS, top_k=8, ridge=0.1,
                          checkpoint_every=every, parent=parent, unchanged_before=unchanged_before,
                          refit_target=refit_target)
    return run_step(decoder, windows, 4, request, weights or {}, memo)


def _two_steps(decoder, windows, memo, every, refit_target="local"):
    """A step from the dense model, then the step after removing its choice with its refit, walking
    from the first step's checkpoints (so parked ones are brought back and used)."""
    first = _step(decoder, windows, Mask(), memo, every=every, refit_target=refit_target)
    choice = first["choice"]
    after = Mask().remove(Block.from_index(choice["block"]))
    tuned, weights = (), {}
    if choice["weight"] is not None:
        tuned, weights = ((choice["target"] // 2, choice["sha"]),), {choice["sha"]: torch.as_tensor(choice["weight"])}
    rescore = rescore_after(after, decoder.arch.num_layers, choice["block"])
    known = [(s, first["sensitivity"][s]) for s in present_blocks(after, decoder.arch.num_layers) if s not in rescore]
    second = _step(decoder, windows, after, memo, candidates=rescore, known=known, tuned=tuned, weights=weights,
                   parent=first["state"], unchanged_before=choice["block"], every=every, refit_target=refit_target)
    return first, second


def _same_step(got, expected):
    assert got["tokens"] == expected["tokens"] and got["nll_sum"] == pytest.approx(expected["nll_sum"], rel=1e-6)
    assert got["walk_start"] == expected["walk_start"]
    assert got["sensitivity"].keys() == expected["sensitivity"].keys()
    for s, value in expected["sensitivity"].items():
        assert got["sensitivity"][s] == pytest.approx(value, rel=1e-6, abs=1e-9), s
    assert [(t["block"], t["status"]) for t in got["tuned"]] == [(t["block"], t["status"]) for t in expected["tuned"]]
    for g, e in zip(got["tuned"], expected["tuned"]):
        assert g["sensitivity"] == pytest.approx(e["sensitivity"], rel=1e-6, abs=1e-9)
    assert got["choice"]["block"] == expected["choice"]["block"]  # the decision
    if expected["choice"]["weight"] is None:
        assert got["choice"]["weight"] is None
    else:
        assert np.allclose(got["choice"]["weight"], expected["choice"]["weight"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("refit_target", ["local", "dense"])  # dense: the dense model's checkpoints too
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("every", [1, 2])
def test_tiny_budget_parks_checkpoints_on_the_host_and_changes_nothing(family, tied, every, refit_target, monkeypatch):
    import actors.sprint

    homes_of_sums: list[str] = []

    class Spy(actors.sprint.DownProjFit):
        def __init__(self, width, hidden, device="cpu"):
            homes_of_sums.append(str(device))
            super().__init__(width, hidden, device)

    monkeypatch.setattr(actors.sprint, "DownProjFit", Spy)
    arch = tiny_arch(family)
    windows = _windows(arch)
    with emulate():
        model, _ = emulated_model(family, 2, tied=tied)
        decoder = LeanDecoder(model, arch)
        ids = windows.to(decoder.embed_tokens.weight.device)
        plain = Checkpoints()
        expected = _two_steps(decoder, ids, plain, every, refit_target)
        assert plain.parked() == 0 and plain.device_bytes() > 0  # no CUDA to ask: no default budget here
        assert homes_of_sums and all(h.startswith("cuda") for h in homes_of_sums)  # refit sums on the GPUs
        homes_of_sums.clear()
        budgeted = Checkpoints(memory_budget=1)
        got = _two_steps(decoder, ids, budgeted, every, refit_target)
        assert homes_of_sums and set(homes_of_sums) == {"cpu"}  # beyond the budget: in host memory
        assert budgeted.device_bytes() == 0 and budgeted.parked() > 0
        kept = [t for streams in budgeted._states.values() for t in streams.values()]
        assert all(isinstance(t, Parked) and device_of(t.host) == "cpu" for t in kept)
        # each comes back, rows at a time, to the device it left: checkpoints enter layers 0, 1, 2, 3
        # (every=1; the one entering layer 3 leaves layer 2, on cuda:1) or layers 0 and 2 (on cuda:0)
        homes = {str(t.device) for t in kept}
        assert homes == ({"cuda:0", "cuda:1"} if every == 1 else {"cuda:0"})
        for t in kept:
            assert device_of(t[1:3]) == str(t.device) and t[1:3].shape == (2, *t.shape[1:])
    # The second step walked from a parked checkpoint (every=1; with every=2 the one before its first
    # candidate is block 0), and (dense target) both steps' refits read the parked dense checkpoints.
    assert got[1]["walk_start"] > 0 or every == 2
    for g, e in zip(got, expected):
        _same_step(g, e)


def _on_gpu(seed: int) -> dict[int, torch.Tensor]:
    return {0: torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed)).to("cuda:1")}


def test_the_least_recently_used_states_are_parked_first():
    on_gpu = _on_gpu
    with emulate():
        one = tensor_bytes(on_gpu(0)[0])
        memo = Checkpoints()
        memo.put("w", "a", on_gpu(1))
        memo.put("w", "b", on_gpu(2))  # no budget: both stay on the device
        assert memo.device_bytes() == 2 * one and memo.parked() == 0
        memo.get("w", "a")  # a is now used more recently than b
        memo.put("w", "c", on_gpu(3), budget=2 * one)
        assert isinstance(memo.get("w", "b")[0], Parked) and memo.device_bytes() == 2 * one
        assert device_of(memo.get("w", "a")[0]) == device_of(memo.get("w", "c")[0]) == "cuda:1"
        memo.get("w", "a")
        memo.get("w", "c")  # b is the least recently used again
        memo.put("w", "d", on_gpu(4), budget=one)  # max_states 3: b is dropped; then a and c are parked
        assert memo.get("w", "b") == {} and memo.parked() == 2
        assert isinstance(memo.get("w", "a")[0], Parked) and isinstance(memo.get("w", "c")[0], Parked)
        assert device_of(memo.get("w", "d")[0]) == "cuda:1" and memo.device_bytes() == one
        back = memo.get("w", "c")[0][0:2]
        assert device_of(back) == "cuda:1" and torch.equal(back.cpu(), on_gpu(3)[0].cpu())


def test_on_a_cpu_there_is_nothing_to_park():
    """A CPU replica's checkpoints already are in host memory, whatever the budget."""
    arch = tiny_arch("qwen2")
    decoder = LeanDecoder(tiny_twin("qwen2"), arch)
    memo = Checkpoints(memory_budget=1)
    _step(decoder, _windows(arch), Mask(), memo)
    assert memo.parked() == 0 and memo.device_bytes() == 0
