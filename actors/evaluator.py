"""The evaluator: one model replica that scores masks. Wrapped as a Ray actor by the orchestrator.

It is dumb and idempotent: the model loads in ``__init__`` (so a restarted actor is whole again),
``evaluate`` has no side effects, and it keeps no search state. Masks travel as canonical JSON.
SPRINT's ``sprint_step`` (a whole step) and ``sprint_shard``/``sprint_solve`` (its phases, spread over
a pool) receive their whole state in the request (refitted weights named by content hash) and keep
only content-addressed memos (checkpoint streams, weights by hash) that a restart may lose;
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
                 rows: Sequence[int] | None = None, fitness: str = "ppl") -> list[dict[str, Any]]:
        """Score masks (canonical JSON) on a named window set; one dict per mask, in order.

        ``rows`` (start, stop): only those windows of the set (a shard). NLL sums and token counts of
        disjoint shards add up to the whole set's, exactly so for shards cut at batch boundaries.
        ``fitness`` (``search_spaces.scores.fitness_tag``): ``ppl``, or ``kl``/``kl:<K>``, whose
        ``nll_sum`` is the summed KL(dense || mask) against the dense model's log-probabilities,
        computed once per window set on this replica (actors/kl.py)."""
        from search_spaces import Mask
        from search_spaces.scores import parse_fitness

        windows = self.windows[window_set]
        start, stop = 0, windows.shape[0]
        if rows is not None:
            start, stop = (int(r) for r in rows)
            if not 0 <= start < stop <= windows.shape[0]:
                raise ValueError(f"rows {tuple(rows)} is not a window range of {window_set!r}, which holds "
                                 f"{windows.shape[0]} windows; pass 0 <= start < stop <= {windows.shape[0]}")
            windows = windows[start:stop]
        kind, top_k = parse_fitness(fitness)
        loss = None
        if kind == "kl":
            from .kl import kl_sum

            reference = self._dense_reference(window_set, top_k)
            decoder = self.engine.decoder
            loss = lambda h, batch, at: kl_sum(decoder, h, reference.rows(start + at, start + at + batch.shape[0]))  # noqa: E731
        parsed = [Mask.from_json(m) for m in masks]
        scores = self.engine.score_masks(windows, parsed, None if base is None else Mask.from_json(base), loss)
        return [{"nll_sum": s.nll_sum, "tokens": s.tokens, "seconds": s.seconds, "worker": self.worker}
                for s in scores]

    def _dense_reference(self, window_set: str, top_k: int | None):
        """The dense model's log-probabilities on a window set (KL fitness), computed once; the
        latest one only is kept (a campaign scores one calibration set with one fitness)."""
        from .kl import DenseReference

        key = (window_set, top_k)
        if getattr(self, "_reference", (None, None))[0] != key:
            self._reference = (None, None)  # free the old one first
            self._reference = (key, DenseReference.compute(self.engine.decoder, self.windows[window_set],
                                                           self.engine.batch_size, top_k))
        return self._reference[1]

    # ---- SPRINT (search state travels in the arguments; see actors/sprint.py) ---------------------
    # ``sources`` map the content hash of every refitted weight the request's ``tuned`` names to where
    # it is (actors/weight_source.py). A call that cannot get some answers ``{"need_weights": [...]}``
    # and does nothing else; the driver sends those by reference and calls again.
    def _sprint_setup(self, request: Mapping[str, Any], sources: Mapping[str, Any], extra: frozenset[str] | set[str] = frozenset()):
        from search_spaces.sprint import StepRequest

        from .sprint import Checkpoints
        from .weight_source import WeightMemo

        req = StepRequest.from_dict(request)
        named = {sha for _, sha in req.tuned} | extra
        if named - set(sources):
            raise ValueError(f"no source for refitted weights {sorted(named - set(sources))[:3]}; pass one for "
                             f"every sha the request's tuned names")
        if not hasattr(self, "_sprint_memo"):  # memos only: content-addressed, lost on restart, no state
            self._sprint_memo, self._sprint_weights = Checkpoints(), WeightMemo()
        missing = self._sprint_weights.resolve(sources)
        return req, missing

    def sprint_step(self, request: Mapping[str, Any], sources: Mapping[str, Any]) -> dict[str, Any]:
        """One whole SPRINT step (``StepRequest.to_dict()``) on every window of its set. Returns the
        step's result with ``worker`` added (``choice.weight`` as numpy fp32)."""
        from .sprint import run_step

        req, missing = self._sprint_setup(request, sources)
        if missing:
            return {"need_weights": missing, "worker": self.worker}
        result = run_step(self.engine.decoder, self.windows[req.window_set], self.engine.batch_size, req,
                          self._sprint_weights.weights, self._sprint_memo)
        return {**result, "worker": self.worker}

    def sprint_shard(self, phase: str, request: Mapping[str, Any], rows: Sequence[int], sources: Mapping[str, Any],
                     payload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One phase of a SPRINT step on the windows ``rows`` (start, stop) of the request's set: sums
        over those windows that the driver adds up over shards (orchestrator/sprint_pool.py).

        - ``scores``: ``nll_sum``, ``tokens``, ``sensitivity``, ``walk_start``, ``state``;
        - ``moments`` (payload ``top``): ``moments``, per candidate with a refit, ``zz`` (w x w),
          ``zr`` (w x H) as numpy float64, ``rr`` and ``tokens``;
        - ``rescore`` (payload ``weights``: candidate -> sha of its refitted weight, with a source):
          ``sensitivity`` of those candidates with their refits.

        The streams of a step stay on this replica from ``scores`` until the phase whose payload says
        ``last`` (``rescore`` by default; a ``moments`` phase after it when a remembered candidate won
        and its refit is summed again), or until the next step's ``scores``.
        """
        import torch

        from .sprint import StepWork

        t0 = time.perf_counter()
        weights = {int(s): sha for s, sha in (payload or {}).get("weights", {}).items()}
        req, missing = self._sprint_setup(request, sources, set(weights.values()))
        if missing:
            return {"need_weights": missing, "worker": self.worker}
        windows = self.windows[req.window_set]
        start, stop = (int(r) for r in rows)
        if not 0 <= start < stop <= windows.shape[0]:
            raise ValueError(f"rows {tuple(rows)} is not a window range of {req.window_set!r}, which holds "
                             f"{windows.shape[0]} windows; pass 0 <= start < stop <= {windows.shape[0]}")
        work = StepWork(self.engine.decoder, windows[start:stop], self.engine.batch_size, req,
                        self._sprint_weights.weights, self._sprint_memo, f"{req.window_set}[{start}:{stop}]")
        if phase not in ("scores", "moments", "rescore"):
            raise ValueError(f"unknown SPRINT phase {phase!r}; use scores, moments or rescore")
        if phase == "scores":
            self._sprint_memo.drop_step()  # a new step: the last one's streams go first
        with work.active():
            if phase == "scores":
                out = work.scores(keep=True)
            elif phase == "moments":
                fits = work.moments([int(s) for s in payload["top"]])
                out = {"moments": {s: {"zz": f.zz.cpu().numpy(), "zr": f.zr.cpu().numpy(), "rr": f.rr,
                                       "tokens": f.tokens} for s, f in fits.items()}}
            else:
                tensors = {s: self._sprint_weights.weights[sha] for s, sha in weights.items()}
                out = {"sensitivity": work.rescore({s: t.to(torch.float32) for s, t in tensors.items()})}
        if (payload or {}).get("last", phase == "rescore"):
            self._sprint_memo.drop_step()  # the step's last phase on this replica
        return {**out, "seconds": time.perf_counter() - t0, "worker": self.worker}

    def sprint_solve(self, request: Mapping[str, Any], sources: Mapping[str, Any], block: int,
                     moments: Mapping[str, Any]) -> dict[str, Any]:
        """Solve the refit after candidate ``block`` from its normal equations summed over every
        shard (``zz``, ``zr``, ``rr``, ``tokens``), against this replica's current ``down_proj``.
        Returns ``status``, ``before``, ``after``, and for an ``ok`` refit its ``weight`` (numpy fp32)
        and ``sha``; this replica keeps the weight for the re-scores that follow."""
        from search_spaces.sprint import tensor_key

        from .refit import DownProjFit
        from .sprint import StepWork

        req, missing = self._sprint_setup(request, sources)
        if missing:
            return {"need_weights": missing, "worker": self.worker}
        work = StepWork(self.engine.decoder, self.windows[req.window_set][:0], self.engine.batch_size, req,
                        self._sprint_weights.weights, self._sprint_memo)
        with work.active():
            fit = DownProjFit.from_moments(moments, work.down_proj(int(block)).weight.device)
            result = work.solve({int(block): fit})[int(block)]
        out: dict[str, Any] = {"status": result.status, "before": result.before, "after": result.after,
                               "weight": None, "sha": None, "worker": self.worker}
        if result.ok:
            weight = result.weight.cpu().numpy()
            out["weight"], out["sha"] = weight, tensor_key(tuple(weight.shape), "float32", weight.tobytes())
            self._sprint_weights.add(out["sha"], result.weight)
        return out

    def latency_table(self, prompt: int, generate: int = 0, repeats: int = 5) -> dict[str, Any]:
        """This replica's latency table (``LatencyTable.to_dict()``) covering the scenario; measured
        on this device unless cached under ``cache_dir()/latency/``."""
        from search_spaces.latency import Scenario

        from .latency import latency_table

        scenario = Scenario(int(prompt), int(generate))
        return latency_table(self.model, self.arch, self.model_fingerprint, scenario, repeats=repeats).to_dict()

