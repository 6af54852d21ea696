"""Exact evaluation of many masks on one calibration set, sharing the work they have in common.

A greedy step scores masks that differ from the current model (the *base*) in one block each. The
engine takes the calibration batches in the outer loop and the masks in the inner loop: it runs the
base once per batch, keeps the residual stream entering every block where some mask diverges, then
runs each mask only from its first differing block onward. The result is bit-for-bit what a full
forward of each mask gives (same operations on the same tensors), at the cost of the masks' suffixes.

``evaluate_naive`` is the reference loop (one full forward per mask) kept for tests and benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from search_spaces import Mask

    from .forward import LeanDecoder


@dataclass(frozen=True)
class Score:
    """Summed NLL over the predicted tokens of a window set; add scores of disjoint batches."""

    nll_sum: float
    tokens: int
    seconds: float = 0.0

    def __add__(self, other: Score) -> Score:
        return Score(self.nll_sum + other.nll_sum, self.tokens + other.tokens, self.seconds + other.seconds)


class Engine:
    """Evaluates masks over token windows with prefix reuse. Holds no search state."""

    def __init__(self, decoder: LeanDecoder, batch_size: int = 4) -> None:
        self.decoder = decoder
        self.batch_size = batch_size

    def _batches(self, windows: torch.Tensor):
        for start in range(0, windows.shape[0], self.batch_size):
            yield windows[start : start + self.batch_size]

    def evaluate(self, windows: torch.Tensor, masks: Sequence[Mask], base: Mask | None = None) -> list[Score]:
        """Scores of ``masks`` on ``windows`` (N, T); with ``base``, suffixes only.

        ``base`` need not be one of ``masks``; any mask may differ from it anywhere (it then simply
        starts earlier). Without ``base`` every mask runs in full, as in the naive loop.
        """
        decoder, num_blocks = self.decoder, self.decoder.arch.num_blocks
        if base is None:
            starts: list[int | None] = [0] * len(masks)
        else:
            starts = [base.first_difference(m, decoder.arch.num_layers) for m in masks]
        # None: the mask runs exactly like the base; it is scored from the base's final stream.
        kept_at = {num_blocks if s is None else s for s in starts}
        base_stop = max(kept_at)
        totals = [Score(0.0, 0)] * len(masks)
        with torch.inference_mode():
            for batch in self._batches(windows):
                t0 = time.perf_counter()
                h = decoder.embed(batch)
                rope = decoder.rope(h)
                streams = {0: h}
                for index in range(base_stop if base is not None else 0):
                    h = decoder.block(index, h, base, rope)
                    if index + 1 in kept_at:
                        streams[index + 1] = h
                shared = time.perf_counter() - t0
                base_score: Score | None = None
                for i, (mask, start) in enumerate(zip(masks, starts)):
                    t1 = time.perf_counter()
                    if start is None:
                        if base_score is None:
                            base_score = Score(*decoder.nll(streams[num_blocks], batch))
                        score = base_score
                    else:
                        score = Score(*decoder.nll(decoder.run(streams[start], mask, start), batch))
                    own = time.perf_counter() - t1
                    totals[i] = totals[i] + Score(score.nll_sum, score.tokens, own + shared / len(masks))
        return totals

    def evaluate_naive(self, windows: torch.Tensor, masks: Sequence[Mask]) -> list[Score]:
        """Reference loop: one full forward per mask, mask in the outer loop."""
        results = []
        with torch.inference_mode():
            for mask in masks:
                total = Score(0.0, 0)
                t0 = time.perf_counter()
                for batch in self._batches(windows):
                    h = self.decoder.run(self.decoder.embed(batch), mask)
                    total = total + Score(*self.decoder.nll(h, batch))
                results.append(Score(total.nll_sum, total.tokens, time.perf_counter() - t0))
        return results
