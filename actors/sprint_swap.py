"""The weights a SPRINT step runs with besides the current model's, and the streams it records.

:class:`TunedSwap` puts the refitted ``down_proj`` weights a request names into the replica and
takes them out again; :func:`original_weights` takes them out for a while, which is how the dense
model's streams are walked for ``refit_target: dense`` (:func:`dense_streams`, kept in the step's
memo and reused by every step). Those and the step's own streams of every window are recorded into
:class:`AllWindows`: one buffer per block, allocated at the first batch on the device of the layer
that made the stream and filled one batch of rows at a time, so that a store of ``n`` streams takes
``n`` x windows x tokens x hidden at its peak (per-batch pieces and their concatenation would take
twice that for a moment). ``search_spaces.memory`` counts the stores this way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch

from search_spaces import Mask
from search_spaces.sprint import state_key

from .sprint_memo import Checkpoints, Parked

if TYPE_CHECKING:
    from .forward import LeanDecoder

__all__ = ["AllWindows", "TunedSwap", "batches", "dense_streams", "original_weights", "walk_streams"]


class TunedSwap:
    """Puts refitted ``down_proj`` weights into the replica (``apply``) and takes them out again
    (``restore``), without copying the rest of the model. Use as a context manager."""

    def __init__(self, decoder: LeanDecoder, weights: Mapping[int, torch.Tensor]) -> None:
        self.decoder = decoder
        self.weights = dict(weights)
        self._saved: dict[int, torch.nn.Parameter] = {}

    def apply(self) -> None:
        for layer, weight in self.weights.items():
            linear = self.decoder.layers[layer].mlp.down_proj
            self._saved.setdefault(layer, linear.weight)
            old = self._saved[layer]
            new = weight.to(old.device, old.dtype)  # (H, w) with w <= the full width
            if new.shape != old.shape:
                new = torch.cat([new, old.data[:, new.shape[1]:]], dim=1)
            linear.weight = torch.nn.Parameter(new, requires_grad=False)

    def restore(self) -> None:
        for layer, old in self._saved.items():
            self.decoder.layers[layer].mlp.down_proj.weight = old
        self._saved.clear()

    def __enter__(self) -> TunedSwap:
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@contextmanager
def original_weights(swap: TunedSwap) -> Iterator[None]:
    """The original weights for a while (dense targets), the refitted ones again afterwards."""
    swap.restore()
    try:
        yield
    finally:
        swap.apply()


def batches(n: int, size: int) -> list[slice]:
    """Rows ``0..n-1`` in batches of ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class AllWindows:
    """Streams (N, T, H) of all ``n`` windows entering some blocks, filled one batch at a time.

    Each block's buffer is allocated at its first batch with that batch's device and dtype (the
    stream entering a block lives on the device of the last block that ran before it, the same for
    every batch), so a replica over k GPUs keeps each stream where the next block reads it.
    """

    def __init__(self, n: int, blocks: Iterable[int]) -> None:
        self.n = n
        self._buffers: dict[int, torch.Tensor | None] = {c: None for c in blocks}

    def add(self, block: int, rows: slice, h: torch.Tensor) -> None:
        """Rows ``rows`` of the stream entering ``block`` (ignored for a block not recorded)."""
        if block not in self._buffers:
            return
        buffer = self._buffers[block]
        if buffer is None:
            buffer = self._buffers[block] = h.new_empty((self.n, *h.shape[1:]))  # (N, T, H)
        buffer[rows] = h

    @property
    def streams(self) -> dict[int, torch.Tensor]:
        """The recorded streams (blocks that got no batch, as with no windows at all, left out)."""
        return {c: t for c, t in self._buffers.items() if t is not None}


def walk_streams(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, mask: Mask,
                 blocks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Streams of ``mask`` entering each of ``blocks``, over all windows."""
    out, last = AllWindows(windows.shape[0], blocks), max(blocks)
    for rows in batches(windows.shape[0], batch_size):
        h = decoder.embed(windows[rows])  # (B, T, H)
        rope = decoder.rope(h)
        for i in range(last + 1):
            out.add(i, rows, h)
            if i < last:
                h = decoder.block(i, h, mask, rope)
    return out.streams


def dense_streams(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, swap: TunedSwap,
                  memo: Checkpoints, window_key: str, blocks: tuple[int, ...],
                  budget: int | None) -> dict[int, torch.Tensor | Parked]:
    """The dense model's streams entering ``blocks`` on these windows: from the memo, else walked
    once with the original weights and kept there (parked beyond ``budget``), for every later step."""
    key = state_key(Mask(), ())
    if not memo.get(window_key, key):
        with original_weights(swap):
            memo.put(window_key, key, walk_streams(decoder, windows, batch_size, Mask(), blocks), budget)
    return memo.get(window_key, key)  # some may be parked now
