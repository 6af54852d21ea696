"""The scorer: a failed mask is data, a batch whose every mask failed stops the run."""

from __future__ import annotations

import math

import pytest

from orchestrator.cache import EvalCache
from orchestrator.dispatch import Outcome
from orchestrator.scorer import EveryMaskFailed, Scorer
from search_spaces import Block, Mask
from tests.tiny import tiny_arch

ARCH = tiny_arch("llama")
MASKS = [Mask().remove(Block(layer, "attn")) for layer in range(3)]


class Dispatcher:
    """Answers every task at once: masks named in ``fail`` fail with an error, the others score."""

    actors = ["one"]

    def __init__(self, fail: set[str]) -> None:
        self.fail = fail

    def run(self, tasks):
        for task in tasks:
            for mask in task.masks:
                single = type(task)(task.window_set, [mask], task.base)
                if mask in self.fail:
                    yield Outcome(single, None, "evaluation raised: CUDA out of memory")
                else:
                    yield Outcome(single, [{"nll_sum": 10.0, "tokens": 5, "seconds": 0.1, "worker": "w"}])


def scorer(tmp_path, fail: set[str]) -> Scorer:
    return Scorer(EvalCache(tmp_path / "evals", flush_every=None), Dispatcher(fail), ARCH, "model", {"calibration": "w"})


def test_a_failed_mask_is_data(tmp_path):
    scores = scorer(tmp_path, {MASKS[0].to_json()}).score(MASKS, Mask(), "calibration", "step 1")
    assert math.isnan(scores[MASKS[0]]) and scores[MASKS[1]] == pytest.approx(math.exp(2.0))


def test_a_batch_whose_every_mask_failed_stops_with_the_first_error(tmp_path):
    every = scorer(tmp_path, {m.to_json() for m in MASKS})
    with pytest.raises(EveryMaskFailed, match="all 3 masks failed.*CUDA out of memory"):
        every.score(MASKS, Mask(), "calibration", "step 1")
    assert every.counters.failed == 3  # recorded as failed: a rerun tries them again
    assert all(every.cache.get_failed(every.key(m, "calibration")) for m in MASKS)
