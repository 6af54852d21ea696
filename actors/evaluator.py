"""The evaluator: one model replica that scores masks. Wrapped as a Ray actor by the orchestrator.

It is dumb and idempotent: the model loads in ``__init__`` (so a restarted actor is whole again),
``evaluate`` has no side effects, and it keeps no search state. Masks travel as canonical JSON.
SPRINT's ``sprint_step`` receives its whole state in the request (refitted weights as arguments) and
keeps only content-addressed memos (checkpoint streams, weights by hash) that a restart may lose;
``latency_table`` measures this device once per model (cached on disk).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping, Sequence

import numpy as np

from .offload import check_not_offloaded
from .permutation import Permutation, apply_permutation_, checkpoint_permutation


def dtype_suffix(dtype: str) -> str:
    """What a replica's dtype adds to its model fingerprint: nothing for ``float32``, ``+bfloat16`` /
    ``+float16`` otherwise."""
    return "" if dtype == "float32" else f"+{dtype}"


def load_device(device_map: str | dict | None) -> str:
    """The device type a replica loaded with ``device_map`` computes on, before loading it:
    ``cpu`` for None (or a map onto CPUs only), ``cuda`` for ``cuda``/``cuda:N``, a GPU index in a map,
    or ``auto`` with a GPU visible."""
    import torch

    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        places = list(device_map.values())
    elif device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    else:
        places = [device_map]
    on_gpu = any(isinstance(p, int) and not isinstance(p, bool) or str(p).startswith("cuda") for p in places)
    return "cuda" if on_gpu else "cpu"


class Evaluator:
    """Holds one replica and named token-window sets (e.g. ``calibration``, ``evaluation``).

    The replica's MLP channels and head units are put in L1 order (``reorder``) by ``permutation``,
    the order computed once from the checkpoint in float64 (:mod:`actors.permutation`; a campaign
    computes it once and hands the same one to every replica, export and eval). Without one, it is
    read from this machine's cache or computed from the checkpoint, never from the loaded weights, so
    it is the same in every dtype and process. The fingerprint names it (``+l1.<digest>``), keeping
    cache keys honest; a permutation computed from other weights is refused.

    ``dtype`` (``auto``, ``bfloat16``, ``float16``, ``float32``) is resolved for the device the
    replica loads on (``actors.models.resolve_dtype``: ``auto`` is bf16 on a CUDA device with native
    bf16, else fp16 on CUDA, fp32 on a CPU) and the weights load in it, never upcast; the loss stays
    fp32 (``LeanDecoder.nll``). fp32 on CUDA enables TF32 matmuls. A dtype other than fp32 is part
    of the fingerprint (``+bfloat16``, ``+float16``), so a cache never serves scores of another
    dtype; fp32 adds nothing.
    """

    def __init__(
        self,
        model: str,
        windows: Mapping[str, np.ndarray],
        *,
        batch_size: int = 4,
        num_threads: int | None = None,
        dtype: str = "auto",
        device_map: str | dict | None = None,
        reorder: bool = True,
        permutation: Permutation | None = None,
    ) -> None:
        import torch

        from search_spaces import Arch

        from .engine import Engine
        from .fingerprint import model_fingerprint
        from .forward import LeanDecoder
        from .models import load_model, resolve_dtype, resolve_model

        if num_threads:
            torch.set_num_threads(num_threads)
        t0 = time.perf_counter()
        path = resolve_model(model)
        checkpoint = model_fingerprint(path)
        if reorder:
            permutation = permutation or checkpoint_permutation(path)
            permutation.require_checkpoint(checkpoint, str(path))
        torch_dtype = resolve_dtype(dtype, load_device(device_map))
        self.dtype = str(torch_dtype).removeprefix("torch.")
        self.model = load_model(path, dtype=torch_dtype, device_map=device_map)
        check_not_offloaded(self.model)  # the lean forward reads weights directly: refuse before any work
        self.arch = Arch.from_hf_config(self.model.config.to_dict())
        if reorder:  # widths keep the most important channels/units first (a pure permutation)
            apply_permutation_(self.model, self.arch, permutation)
        self.permutation = permutation if reorder else None
        self.device = self.model.model.embed_tokens.weight.device
        if self.device.type == "cuda" and torch_dtype == torch.float32:  # fp32 on CUDA: TF32 matmuls
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # On a CPU, one concurrent candidate stream per thread beats spreading every kernel (bench/).
        streams = torch.get_num_threads() if self.device.type == "cpu" else 1
        self.engine = Engine(LeanDecoder(self.model, self.arch), batch_size=batch_size, streams=streams)
        self.windows = {name: torch.tensor(np.asarray(w), dtype=torch.long, device=self.device)
                        for name, w in windows.items()}
        self.model_fingerprint = (checkpoint + (f"+{permutation.tag}" if reorder else "")
                                  + dtype_suffix(self.dtype))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker, "pid": os.getpid(), "model_fingerprint": self.model_fingerprint,
                "load_seconds": self.load_seconds, "device": str(self.device), "dtype": self.dtype,
                "threads": __import__("torch").get_num_threads()}

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Score masks (canonical JSON) on a named window set; one dict per mask, in order.

        ``rows`` (start, stop): only those windows of the set (a shard). NLL sums and token counts of
        disjoint shards add up to the whole set's, exactly so for shards cut at batch boundaries."""
        from search_spaces import Mask

        windows = self.windows[window_set]
        if rows is not None:
            start, stop = (int(r) for r in rows)
            if not 0 <= start < stop <= windows.shape[0]:
                raise ValueError(f"rows {tuple(rows)} is not a window range of {window_set!r}, which holds "
                                 f"{windows.shape[0]} windows; pass 0 <= start < stop <= {windows.shape[0]}")
            windows = windows[start:stop]
        parsed = [Mask.from_json(m) for m in masks]
        scores = self.engine.score_masks(windows, parsed, None if base is None else Mask.from_json(base))
        return [{"nll_sum": s.nll_sum, "tokens": s.tokens, "seconds": s.seconds, "worker": self.worker}
                for s in scores]

    # ---- SPRINT (search state travels in the arguments; see actors/sprint.py) ---------------------
    def sprint_step(self, request: Mapping[str, Any], *weights: Any) -> dict[str, Any]:
        """One SPRINT step (``StepRequest.to_dict()``); ``weights``: the refitted down_proj weights
        the request's ``tuned`` names, in its order (numpy or torch, H x w). Returns the step's result
        with ``worker`` added (``choice.weight`` as numpy fp32)."""
        import torch

        from search_spaces.sprint import StepRequest

        from .sprint import Checkpoints, run_step

        req = StepRequest.from_dict(request)
        if len(weights) != len(req.tuned):
            raise ValueError(f"sprint_step got {len(weights)} weight tensors for {len(req.tuned)} tuned layers; "
                             f"pass one per entry of request['tuned'], in order")
        if not hasattr(self, "_sprint_memo"):  # memos only: content-addressed, lost on restart, no state
            self._sprint_memo, self._sprint_weights = Checkpoints(), {}
        for (_, sha), array in zip(req.tuned, weights):
            if sha not in self._sprint_weights:
                self._sprint_weights[sha] = torch.as_tensor(np.array(array, dtype=np.float32))
        needed = {sha for _, sha in req.tuned}
        self._sprint_weights = {k: v for k, v in self._sprint_weights.items() if k in needed}
        result = run_step(self.engine.decoder, self.windows[req.window_set], self.engine.batch_size, req,
                          self._sprint_weights, self._sprint_memo)
        return {**result, "worker": self.worker}

    def latency_table(self, prompt: int, generate: int = 0, repeats: int = 5) -> dict[str, Any]:
        """This replica's latency table (``LatencyTable.to_dict()``) covering the scenario; measured
        on this device unless cached under ``cache_dir()/latency/``."""
        from search_spaces.latency import Scenario

        from .latency import latency_table

        scenario = Scenario(int(prompt), int(generate))
        return latency_table(self.model, self.arch, self.model_fingerprint, scenario, repeats=repeats).to_dict()

