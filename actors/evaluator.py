"""The evaluator: one model replica that scores masks. Wrapped as a Ray actor by the orchestrator.

It is dumb and idempotent: the model loads in ``__init__`` (so a restarted actor is whole again),
``evaluate`` has no side effects, and it keeps no search state. Masks travel as canonical JSON.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Sequence

import numpy as np


class Evaluator:
    """Holds one replica and named token-window sets (e.g. ``calibration``, ``evaluation``).

    The replica is L1-reordered once (``reorder``), as every export is, so width masks mean the
    same thing everywhere; the fingerprint says so, keeping cache keys honest.
    """

    def __init__(
        self,
        model: str,
        windows: Mapping[str, np.ndarray],
        *,
        batch_size: int = 4,
        num_threads: int | None = None,
        dtype: str = "float32",
        device_map: str | dict | None = None,
        reorder: bool = True,
    ) -> None:
        import torch

        from search_spaces import Arch

        from .engine import Engine
        from .fingerprint import model_fingerprint
        from .forward import LeanDecoder
        from .models import load_model, resolve_model
        from .surgery import reorder_by_l1_

        if num_threads:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        path = resolve_model(model)
        self.model = load_model(path, dtype=dtype, device_map=device_map)
        self.arch = Arch.from_hf_config(self.model.config.to_dict())
        if reorder:  # widths keep the most important channels/units first (a pure permutation)
            reorder_by_l1_(self.model, self.arch)
        self.device = self.model.model.embed_tokens.weight.device
        # On a CPU, one concurrent candidate stream per thread beats spreading every kernel (bench/).
        streams = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.engine = Engine(LeanDecoder(self.model, self.arch), batch_size=batch_size, streams=streams)
        self.windows = {name: torch.tensor(np.asarray(w), dtype=torch.long, device=self.device)
                        for name, w in windows.items()}
        self.model_fingerprint = model_fingerprint(path) + ("+l1" if reorder else "")
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker, "pid": os.getpid(), "model_fingerprint": self.model_fingerprint,
                "load_seconds": self.load_seconds, "device": str(self.device),
                "threads": __import__("torch").get_num_threads()}

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None) -> list[dict[str, Any]]:
        """Score masks (canonical JSON) on a named window set; one dict per mask, in order."""
        from search_spaces import Mask

        parsed = [Mask.from_json(m) for m in masks]
        scores = self.engine.evaluate(self.windows[window_set], parsed, None if base is None else Mask.from_json(base))
        return [{"nll_sum": s.nll_sum, "tokens": s.tokens, "seconds": s.seconds, "worker": self.worker}
                for s in scores]
