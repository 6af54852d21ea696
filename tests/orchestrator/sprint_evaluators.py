"""Evaluators for the SPRINT campaign tests: a fixed latency table, and one that dies mid-step.

Ray workers import this module by reference (the repository root is their working directory);
settings travel in subclasses built with ``type(...)``, which are pickled by value.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Mapping

from actors.evaluator import Evaluator
from search_spaces.latency import BlockCosts, LatencyTable

#: Block timings of a tiny model are noise; the tests fix them so that paths are deterministic.
TABLE = LatencyTable("test-device", "fp", {"prefill:512": BlockCosts(0.2, 0.1, 0.25)}, {"prefill:512": 1.6})


class FixedLatency(Evaluator):
    def latency_table(self, prompt: int, generate: int = 0, repeats: int = 5) -> dict[str, Any]:
        return TABLE.to_dict()


class KilledInStep(FixedLatency):
    """The first SPRINT call of the step with ``after`` removals on its path (a whole ``sprint_step``,
    or a ``sprint_shard`` of ``phase`` when the step is spread over the pool) SIGKILLs its process."""

    marker_dir: str = ""
    after: int = 1
    phase: str = "moments"

    def _maybe_die(self, request: Mapping[str, Any]) -> None:
        removed = len(request["mask"]["attn_removed"]) + len(request["mask"]["mlp_removed"])
        if removed == self.after and request["candidates"]:
            try:
                fd = os.open(os.path.join(self.marker_dir, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    def sprint_step(self, request: Mapping[str, Any], sources: Mapping[str, Any]) -> dict[str, Any]:
        self._maybe_die(request)
        return super().sprint_step(request, sources)

    def sprint_shard(self, phase: str, request: Mapping[str, Any], *args: Any) -> dict[str, Any]:
        if phase == self.phase:
            self._maybe_die(request)
        return super().sprint_shard(phase, request, *args)
