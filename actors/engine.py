"""Exact evaluation of many masks on one calibration set, sharing the work they have in common.

A greedy step scores masks that differ from the current model (the *base*) in one block each. The
engine takes the calibration batches in the outer loop and the masks in the inner loop: it runs the
base once per batch, keeps the residual stream entering every block where some mask diverges, then
runs each mask only from its first differing block onward. The result is bit-for-bit what a full
forward of each mask gives (same operations on the same tensors), at the cost of the masks' suffixes.
Those kept streams grow with the batch (SPEC section 8); under a memory budget (actors/memory.py) a
batch runs in micro-batches small enough to keep them within it.

``score_masks_naive`` is the reference loop (one full forward per mask) kept for tests and benchmarks.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from .memory import engine_bytes_per_sample, micro_batch_size, resolve_budget

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


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: ``loss(h, batch, start)``: summed loss and token count of a batch's final streams (see score_masks).
Loss = Callable[[torch.Tensor, torch.Tensor, int], tuple[float, int]]


class Engine:
    """Evaluates masks over token windows with prefix reuse. Holds no search state.

    ``streams`` > 1 runs that many mask suffixes concurrently, each on one intra-op thread (torch
    releases the GIL inside its kernels). On a small CPU this beats splitting every small kernel
    over all cores; on a GPU keep 1. Results are the same up to float summation order.

    ``memory_budget`` (bytes) bounds the working memory of one batch (actors/memory.py): kept
    streams, streams in flight and MLP temporaries. None takes the default of the decoder's devices:
    a share of the GPUs' memory, no limit on a CPU (where the engine then runs exactly as without it).
    """

    def __init__(self, decoder: LeanDecoder, batch_size: int = 4, streams: int = 1,
                 memory_budget: int | None = None) -> None:
        self.decoder = decoder
        self.batch_size = batch_size
        self.streams = streams
        #: Bytes of working memory one batch may keep (actors/memory.py); None: no limit. An explicit
        #: value overrides the default for the decoder's devices (none on a CPU).
        self.memory_budget = resolve_budget(memory_budget, decoder.model)
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="rayprune-stream") if streams > 1 else None

    def _batches(self, windows: torch.Tensor):
        for start in range(0, windows.shape[0], self.batch_size):
            yield windows[start : start + self.batch_size]

    def micro_batch_size(self, tokens: int, kept: int, runs: int) -> int:
        """Samples per micro-batch so that ``kept`` streams held per batch and ``runs`` suffixes (as
        many at once as there are streams) fit the memory budget; the batch size without a budget."""
        concurrent = min(self.streams, runs) if self._pool is not None and runs > 1 else 1
        element = self.decoder.embed_tokens.weight.element_size()
        per_sample = engine_bytes_per_sample(self.decoder.arch, tokens, element, kept, concurrent)
        return micro_batch_size(self.memory_budget, per_sample, self.batch_size)

    def score_masks(self, windows: torch.Tensor, masks: Sequence[Mask], base: Mask | None = None,
                    loss: Loss | None = None) -> list[Score]:
        """Scores of ``masks`` on ``windows`` (N, T); with ``base``, suffixes only.

        ``loss(h, batch, start)`` turns the final streams of a batch (its first window is row
        ``start`` of ``windows``) into a summed loss and a token count; default: the next-token NLL
        (``LeanDecoder.nll``). KL fitness passes one (actors/kl.py).

        ``base`` need not be one of ``masks``; any mask may differ from it anywhere (it then simply
        starts earlier). Without ``base`` every mask runs in full, as in the naive loop.

        Under a memory budget each batch runs in micro-batches whose kept streams fit it; the scores
        of disjoint micro-batches add up to the batch's (equal up to float summation order).
        """
        if not masks:
            return []
        decoder, num_blocks = self.decoder, self.decoder.arch.num_blocks
        if base is None:
            starts: list[int | None] = [0] * len(masks)
        else:
            starts = [base.first_difference(m, decoder.arch.num_layers) for m in masks]
        # None: the mask runs exactly like the base; it is scored from the base's final stream.
        kept_at = {num_blocks if s is None else s for s in starts}
        kept = len(kept_at | {0}) if base is not None else 1  # the embedding output is always held
        runs = sum(s is not None for s in starts) + (None in starts)  # suffixes run per batch
        micro = self.micro_batch_size(windows.shape[1], kept, runs)
        totals = [Score(0.0, 0)] * len(masks)
        loss = loss or (lambda h, batch, start: decoder.nll(h, batch))
        with torch.inference_mode():
            for first in range(0, windows.shape[0], self.batch_size):
                batch = windows[first:first + self.batch_size]
                for offset in range(0, batch.shape[0], micro):
                    part = batch[offset:offset + micro]
                    scores, same = self._score_batch(part, masks, base, starts, kept_at,
                                                     lambda h, b, at=first + offset: loss(h, b, at))
                    for i, start in enumerate(starts):
                        totals[i] = totals[i] + scores[same if start is None else i]
        return totals

    def _score_batch(self, batch: torch.Tensor, masks: Sequence[Mask], base: Mask | None, starts: list[int | None],
                     kept_at: set[int], loss) -> tuple[dict[int, Score], int | None]:
        """Scores of one (micro-)batch by mask index, and the index scored for the masks equal to the
        base. Its kept streams die when it returns, before the next micro-batch starts."""
        decoder, num_blocks = self.decoder, self.decoder.arch.num_blocks
        t0 = time.perf_counter()
        h = decoder.embed(batch)
        rope = decoder.rope(h)
        streams = {0: h}
        for index in range(max(kept_at) if base is not None else 0):
            h = decoder.block(index, h, base, rope)
            if index + 1 in kept_at:
                streams[index + 1] = h
        shared = (time.perf_counter() - t0) / len(masks)

        def suffix(i: int) -> Score:
            t1 = time.perf_counter()
            start = starts[i]
            h = streams[num_blocks] if start is None else decoder.run(streams[start], masks[i], start)
            return Score(*loss(h, batch), time.perf_counter() - t1 + shared)

        # Masks equal to the base share one score; the others run their suffixes,
        # longest first so that concurrent streams finish together.
        same = [i for i, s in enumerate(starts) if s is None]
        runs = sorted((i for i, s in enumerate(starts) if s is not None), key=lambda i: starts[i])
        return self._map(suffix, runs + same[:1]), (same[0] if same else None)

    def _map(self, fn, indices: list[int]) -> dict[int, Score]:
        if self._pool is None or len(indices) < 2:
            return {i: fn(i) for i in indices}
        with _intra_op_threads(1):
            return dict(zip(indices, self._pool.map(_in_inference_mode(fn), indices)))

    def score_masks_naive(self, windows: torch.Tensor, masks: Sequence[Mask]) -> list[Score]:
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


def _in_inference_mode(fn):
    """Worker threads do not inherit the caller's inference mode: enter it in each."""

    def wrapped(i):
        with torch.inference_mode():
            return fn(i)

    return wrapped
