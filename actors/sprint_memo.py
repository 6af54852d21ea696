"""SPRINT's memo on a replica: the streams entering checkpoint blocks, per window set and model state.

Content-addressed and recomputable: losing it (a restart, another replica) changes no result, only
where a step's walk starts. Beyond the replica's memory budget (actors/memory.py) streams are parked
in host memory and brought back a batch of rows at a time when used.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .memory import tensor_bytes


class Parked:
    """A stream (N, T, H) moved to host memory (pinned when it comes from CUDA, so that copies back
    run asynchronously). ``parked[rows]`` brings those rows back to the device it came from: to code
    that only slices rows out of a checkpoint, it is the tensor it replaces."""

    def __init__(self, t: torch.Tensor) -> None:
        self.device, self.shape, self.dtype = t.device, t.shape, t.dtype
        if torch.cuda.is_available() and t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t)
        else:
            self.host = t.to("cpu")

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.host[rows].to(self.device, non_blocking=True)


class Checkpoints:
    """LRU memo: (window set, state key) -> {checkpoint block: stream entering it, (N, T, H)}.

    Content-addressed and recomputable, so it is a cache, not state: losing it changes no result.
    Streams on a device beyond the budget given to ``put`` are :class:`Parked` in host memory, least
    recently used states first; ``memory_budget`` (bytes) overrides the budget ``run_step`` gives
    (by default the replica's, actors/memory.py).
    """

    def __init__(self, max_states: int = 3, memory_budget: int | None = None) -> None:
        self.max_states = max_states
        self.memory_budget = memory_budget
        self._states: OrderedDict[tuple[str, str], dict[int, torch.Tensor | Parked]] = OrderedDict()
        self._step: tuple[tuple[str, str], dict[int, torch.Tensor | Parked]] | None = None

    def keep_step(self, window_set: str, key: str, streams: dict[int, torch.Tensor | Parked]) -> None:
        """The streams of the step in progress (every block's entering stream, when they fit the
        step's share of memory): the later phases of a sharded step on this replica start from them
        instead of walking again. One step at a time; the next one replaces it."""
        self._step = ((window_set, key), streams)

    def step(self, window_set: str, key: str) -> dict[int, torch.Tensor | Parked] | None:
        """The streams ``keep_step`` kept for this state on these windows, else None."""
        return self._step[1] if self._step is not None and self._step[0] == (window_set, key) else None

    def drop_step(self) -> None:
        self._step = None

    def get(self, window_set: str, key: str | None) -> dict[int, torch.Tensor | Parked]:
        found = self._states.get((window_set, key)) if key else None
        if found is not None:
            self._states.move_to_end((window_set, key))
        return found or {}

    def put(self, window_set: str, key: str, streams: dict[int, torch.Tensor | Parked],
            budget: int | None = None) -> None:
        """Keep ``streams`` as the newest state; then park streams until those left on a device fit
        ``budget`` bytes (None: no limit)."""
        self._states[(window_set, key)] = dict(streams)
        self._states.move_to_end((window_set, key))
        while len(self._states) > self.max_states:
            self._states.popitem(last=False)
        if budget is None:
            return
        excess = self.device_bytes() - budget
        for streams in self._states.values():  # the least recently used first
            for c, t in streams.items():
                if excess <= 0:
                    return
                if isinstance(t, torch.Tensor) and t.device.type != "cpu":
                    streams[c] = Parked(t)
                    excess -= tensor_bytes(t)

    def device_bytes(self) -> int:
        """Bytes of the kept streams that are on a device (not in host memory)."""
        return sum(tensor_bytes(t) for streams in self._states.values() for t in streams.values()
                   if isinstance(t, torch.Tensor) and t.device.type != "cpu")

    def parked(self) -> int:
        """How many kept streams are parked in host memory."""
        return sum(isinstance(t, Parked) for streams in self._states.values() for t in streams.values())
