"""One SPRINT step on one replica: local sensitivities, ``down_proj`` refits, tuned re-scores.

:func:`run_step` takes everything from its :class:`~search_spaces.sprint.StepRequest` and the
refitted weights it names, so the actor holds no search state. What it keeps is a content-addressed
memo (:class:`Checkpoints`): the streams entering every checkpoint block, per window set and model
state (mask + refitted weights). The next step starts its walk at the last checkpoint before the
block it changed; a restarted actor, or another one, just walks from the embeddings. Both give the
same numbers (tests/actors/test_sprint_step.py). Beyond the replica's memory budget (actors/memory.py)
the memo parks checkpoints in host memory and brings back the rows of one batch at a time when used;
the streams a step keeps for itself are bounded by the same budget and recomputed beyond it.

Per step, over the calibration batches (all exact, all in the model's dtype):

1. walk the current model from that checkpoint to the end (NLL of the state on the way); at each
   candidate ``s`` start a branch that skips ``s``; at ``target(s)`` (the next remaining MLP) the
   sensitivity is ``sum over sequences |o - c| / |o|`` (c: stream of the branch; o: the reference,
   with the ``window`` reference a second branch that runs every block from ``s`` to ``target(s)``,
   those already removed included, as SPRINT's code does); ``|.|`` is the L1 norm of a sequence's
   tokens x hidden (SPRINT's ``l2_sentence`` computes that), or its L2 norm (``metric: l2``);
2. rank by ``sensitivity / latency saved``; for the ``top_k`` best without a remembered tuned score
   refit ``down_proj`` of ``target(s)`` so that the pruned model reproduces the reference stream o
   after it (``refit_target: local``, SPRINT) or the *dense* stream after it (``dense``), see
   actors/refit.py;
3. re-score those with their refitted weights; the best among them and the remembered ones is the
   choice (a candidate with no MLP after it scores ``inf``, SPRINT, or its untuned sensitivity); a
   remembered winner has its refit computed again (nothing in its window changed: the same sums).

Everything a phase computes is a sum over windows: the NLL, each sensitivity (a sum over
sequences) and the refit's normal equations (``Z^T Z``, ``Z^T R``, ``R^T R``). :class:`StepWork`
runs the phases one at a time on any range of windows, so a step can also be spread over a pool
(``orchestrator/sprint_pool.py``): every replica runs a phase on its shard, the driver adds the
shards up, ranks, has the refits solved, and asks for the re-scores. :func:`run_step` chains the
phases on one replica.

The refitted weights go in and out of the replica with :class:`~actors.sprint_swap.TunedSwap`, and the
dense model's streams (``refit_target: dense``) are walked in actors/sprint_swap.py; every stream of
all windows a step keeps is recorded there into buffers allocated once (``AllWindows``), the sizes
``search_spaces.memory`` counts.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from search_spaces import Block, Mask
from search_spaces.sprint import (StepRequest, best_tuned, checkpoint_before, checkpoint_blocks, refit_candidates,
                                  refit_targets, restored, state_key, target_block, tensor_key, top_candidates,
                                  tuned_records, window_removed)

from .memory import resolve_budget
from .refit import DownProjFit, FitResult
from .sprint_memo import Checkpoints, Parked
from .sprint_swap import AllWindows, TunedSwap, batches, dense_streams, original_weights

__all__ = ["Checkpoints", "Parked", "STORE_BYTES", "StepWork", "TunedSwap", "mlp_input", "run_step"]

if TYPE_CHECKING:
    from .forward import LeanDecoder

#: Streams kept within a step (entering every block, and the branches of the tuned candidates) up to
#: this many bytes (or the memory budget, when smaller); beyond it they are recomputed from the
#: checkpoints, which are always kept.
STORE_BYTES = 2 << 30


def _seq_score(o: torch.Tensor, c: torch.Tensor, metric: str = "l1") -> float:
    """sum over sequences of |o - c| / |o|, norms over each sequence's tokens x hidden in fp32: L1
    (``l1``; what SPRINT's ``l2_sentence`` computes: ``sqrt(x**2)`` summed) or L2 (``l2``)."""
    # On a replica over k GPUs a branch whose last kept block sits on an earlier device than o's
    # (every block after the candidate removed) arrives there: compare on o's device.
    o, c = o.float().flatten(1), c.to(o.device).float().flatten(1)  # (B, T*H)
    if metric == "l1":
        ratio = (o - c).abs().sum(dim=1) / o.abs().sum(dim=1).clamp_min(1e-30)  # (B,)
    else:
        ratio = (o - c).norm(dim=1) / o.norm(dim=1).clamp_min(1e-30)  # (B,)
    return float(ratio.double().sum())


def mlp_input(decoder: LeanDecoder, layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
    """Input of ``down_proj`` of MLP ``layer`` (first ``width`` channels) on stream ``h``: (B, T, w)."""
    module = decoder.layers[layer]
    mlp = module.mlp
    x = module.post_attention_layernorm(h.to(mlp.gate_proj.weight.device))  # (B, T, H)
    bias = (lambda b: None if b is None else b[:width])
    gate = F.linear(x, mlp.gate_proj.weight[:width], bias(mlp.gate_proj.bias))
    return mlp.act_fn(gate) * F.linear(x, mlp.up_proj.weight[:width], bias(mlp.up_proj.bias))


def _store_bytes(budget: int | None) -> int:
    """What a step may keep for itself: ``STORE_BYTES``, or the memory budget when smaller."""
    return STORE_BYTES if budget is None else min(STORE_BYTES, budget)


def _fits(windows: torch.Tensor, decoder: LeanDecoder, streams: int, budget: int | None) -> bool:
    """Whether ``streams`` residual streams of every window fit in what a step may keep."""
    element = decoder.embed_tokens.weight.element_size()
    return windows.numel() * decoder.arch.hidden_size * element * streams <= _store_bytes(budget)


def _nearest(streams: Mapping[int, torch.Tensor | Parked], index: int) -> int:
    """The last block at or before ``index`` whose entering stream is known (0 always is)."""
    return max(c for c in streams if c <= index)


def run_step(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, request: StepRequest,
             weights: Mapping[str, torch.Tensor], memo: Checkpoints) -> dict[str, Any]:
    """One SPRINT step (see the module docstring); ``weights`` maps content hash -> (H, w) tensor.

    Returns ``nll_sum``/``tokens`` of the request's state on its windows, the new ``sensitivity``
    of every requested candidate, the ``top`` candidates, the ``tuned`` records of the choice's
    candidates (``search_spaces.sprint.tuned_records``) and ``choice``: the best one, with its refit's
    ``status``, ``weight`` (numpy fp32, None when its refit was not kept) and ``sha``.
    The memory budget is ``memo.memory_budget``, else the default of the decoder's devices.
    """
    t0 = time.perf_counter()
    work = StepWork(decoder, windows, batch_size, request, weights, memo)
    with work.active():
        result: dict[str, Any] = {**work.scores(), "top": [], "tuned": [], "choice": None}
        ranked = {**dict(request.known), **result["sensitivity"]}
        if request.top_k > 0 and ranked:
            top = top_candidates(ranked, request.costs, request.top_k)
            fits = work.solve(work.moments(refit_candidates(request, top)))
            rescored = work.rescore({s: fit.weight for s, fit in fits.items() if fit.ok})
            result["top"] = top
            result["tuned"] = tuned_records(request, decoder.arch.num_layers, top, ranked, fit_info(fits), rescored)
            chosen = best_tuned(result["tuned"], request.costs)
            if chosen["status"] == "remembered":  # its refit again, from the same sums
                fits = work.solve(work.moments([chosen["block"]]))
            fit = fits.get(chosen["block"])
            weight = fit.weight.cpu().numpy() if fit is not None and fit.ok else None
            result["choice"] = with_weight({**chosen, **fit_info(fits).get(chosen["block"], {})}, weight)
    result["seconds"] = time.perf_counter() - t0
    return result


def fit_info(fits: Mapping[int, FitResult]) -> dict[int, dict[str, Any]]:
    """``status``/``before``/``after`` of each refit: what a step's records say of it."""
    return {s: {"status": f.status, "before": f.before, "after": f.after} for s, f in fits.items()}


def with_weight(chosen: Mapping[str, Any], weight: Any) -> dict[str, Any]:
    """The chosen record with its refitted ``weight`` (numpy fp32, or None: no refit kept) and the
    weight's content hash ``sha``."""
    sha = None if weight is None else tensor_key(tuple(weight.shape), "float32", weight.tobytes())
    return {**chosen, "sha": sha, "weight": weight}


class StepWork:
    """The phases of one SPRINT step on one range of windows (all of a set, or a shard of it).

    ``scores()`` walks the state, ``moments(top)`` accumulates the refits' normal equations,
    ``solve(fits)`` solves them against the replica's current ``down_proj`` weights, and
    ``rescore(weights)`` scores candidates with refitted weights. Call them inside ``active()``.
    ``window_key`` names the windows in the memo (a shard's own key), so that the phases of a step
    called one by one on this replica reuse the streams of the first; on another replica (or after
    a restart) a phase walks again from whatever checkpoints it has, with the same numbers.
    """

    def __init__(self, decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, request: StepRequest,
                 weights: Mapping[str, torch.Tensor], memo: Checkpoints, window_key: str | None = None) -> None:
        gone = [s for s in [*request.candidates, *dict(request.known), *dict(request.remembered)]
                if request.mask.removed(Block.from_index(s))]
        if gone:
            raise ValueError(f"blocks {gone[:5]} are removed in the request's mask; score only blocks it keeps")
        missing = [h for _, h in request.tuned if h not in weights]
        if missing:
            raise ValueError(f"refitted weights {missing[:3]} were not passed; pass every weight the request's "
                             f"tuned names")
        self.decoder, self.windows, self.batch_size, self.request, self.memo = (decoder, windows, batch_size,
                                                                                request, memo)
        self.window_key = window_key or request.window_set
        self.budget = resolve_budget(memo.memory_budget, decoder.model)
        self.swap = TunedSwap(decoder, {layer: weights[h] for layer, h in request.tuned})
        self.key = state_key(request.mask, request.tuned)
        self.ckpts = checkpoint_blocks(decoder.arch.num_layers, request.checkpoint_every)
        self.batches = batches(windows.shape[0], batch_size)
        self.streams: dict[int, torch.Tensor | Parked] | None = None
        self._branches: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def active(self) -> Iterator[StepWork]:
        """Inference mode, with the request's refitted weights in the replica."""
        with torch.inference_mode(), self.swap:
            yield self

    # ---- 1. walk from the last usable checkpoint, scoring candidates on the way ------------------------
    def scores(self, keep: bool = False) -> dict[str, Any]:
        """``nll_sum``, ``tokens``, the ``sensitivity`` of every requested candidate (sums over these
        windows), ``walk_start`` and ``state``. ``keep``: leave the step's streams in the memo for the
        phases a sharded step calls next on this replica."""
        decoder, windows, request, memo = self.decoder, self.windows, self.request, self.memo
        mask, ws, num_blocks = request.mask, self.window_key, decoder.arch.num_blocks
        candidates = sorted(set(request.candidates))
        want = checkpoint_before(candidates[0], self.ckpts) if candidates else num_blocks
        usable = memo.get(ws, self.key) or {c: t for c, t in memo.get(ws, request.parent).items()
                                             if c <= request.unchanged_before}
        usable = {c: t for c, t in usable.items() if c <= want}
        start = max(usable, default=0)
        finishing: dict[int, list[int]] = {}
        for s in candidates:
            finishing.setdefault(target_block(mask, decoder.arch.num_layers, s), []).append(s)
        restore = self._restore(candidates)  # window references: the blocks of the window run again
        sens = {s: 0.0 for s in candidates}
        keep_all = _fits(windows, decoder, num_blocks + 1 - start, self.budget)  # every entering stream, for refits
        # The stream entering ``start`` is the memo's already (shared with the state it came from).
        recorded = AllWindows(windows.shape[0], [c for c in range(start, num_blocks + 1)
                                                 if (keep_all or c in self.ckpts) and c not in usable])
        nll_sum, tokens = 0.0, 0
        for rows in self.batches:
            batch = windows[rows]
            h = usable[start][rows] if start in usable else decoder.embed(batch)  # (B, T, H)
            rope = decoder.rope(h)
            branches: dict[int, torch.Tensor] = {}
            references: dict[int, torch.Tensor] = {}  # candidates whose window holds removed blocks
            for i in range(start, num_blocks):
                recorded.add(i, rows, h)
                if i in sens:
                    branches[i] = h  # the stream that skips block i
                h_next = decoder.block(i, h, mask, rope)
                for s in branches:
                    if s != i:
                        branches[s] = decoder.block(i, branches[s], mask, rope)
                for s in references:
                    references[s] = decoder.block(i, references[s], restore[s], rope)
                if i in restore:
                    references[i] = h_next  # block i itself runs alike in both
                h = h_next
                for s in finishing.get(i, ()):
                    sens[s] += _seq_score(references.pop(s, h), branches.pop(s), request.metric)
            recorded.add(num_blocks, rows, h)  # the final stream, i.e. "entering" the end
            nll, n = decoder.nll(h, batch)
            nll_sum, tokens = nll_sum + nll, tokens + n
        streams = usable | recorded.streams
        memo.put(ws, self.key, {c: t for c, t in streams.items() if c in self.ckpts}, self.budget)
        self.streams = streams | memo.get(ws, self.key)  # checkpoints the memo parked leave the device too
        if keep:
            memo.keep_step(ws, self.key, self.streams)
        return {"state": self.key, "nll_sum": nll_sum, "tokens": tokens, "walk_start": start, "sensitivity": sens}

    def _streams(self) -> dict[int, torch.Tensor | Parked]:
        """The state's streams on these windows: this step's, the memo's, or a walk (no candidates)."""
        if self.streams is None:
            self.streams = self.memo.step(self.window_key, self.key)
        if self.streams is None:
            self.request = dataclasses.replace(self.request, candidates=())
            self.scores()
        return self.streams

    # ---- 2. the refits' normal equations, and their solution ------------------------------------------
    def moments(self, top: list[int]) -> dict[int, DownProjFit]:
        """The normal equations (:class:`DownProjFit`, summed over these windows) of the refit after
        each candidate of ``top`` that has one (``refit_targets``)."""
        decoder, request, arch = self.decoder, self.request, self.decoder.arch
        targets = refit_targets(request.mask, arch.num_layers, top)
        if not targets:
            return {}
        dense = self._dense_streams() if request.refit_target == "dense" else None
        # Each refit's sums live on its target layer's device (a replica over k GPUs), where z, the
        # targets and the weight it replaces are; in host memory when the float64 sums of all of them
        # exceed the replica's memory budget (70B: 8.5 GB per refit), products still computed on the GPU.
        sums = sum(8 * self._width(s) * (self._width(s) + arch.hidden_size) for s in targets)
        on_host = self.budget is not None and sums > self.budget
        fits = {s: DownProjFit(self._width(s), arch.hidden_size, "cpu" if on_host else self.down_proj(s).weight.device)
                for s in targets}
        # Branches of an earlier call (a remembered winner's refit is summed after the re-scores) are
        # done with: only this call's are kept, so that what is kept never passes the store.
        self._branches = {key: pair for key, pair in self._branches.items() if key[0] in targets}
        per_window = 2 * self.windows[:1].numel() * arch.hidden_size * self.down_proj(next(iter(targets))).weight.element_size()
        self._keep_branches = per_window * self.windows.shape[0] * len(targets) <= _store_bytes(self.budget)
        for b, rows in enumerate(self.batches):
            dense_after: dict[int, torch.Tensor] = {}
            for s, r in targets.items():
                g, o = self._branch(s, b, rows)
                if dense is None:  # local: the reference stream after r, the one the score compares with
                    aim = o.to(g.device)
                else:
                    if r not in dense_after:
                        with original_weights(self.swap):
                            c = _nearest(dense, r + 1)
                            dense_after[r] = decoder.run(dense[c][rows], Mask(), c, r + 1)  # dense stream after r
                    aim = dense_after[r]
                bias = 0.0 if self.down_proj(s).bias is None else self.down_proj(s).bias
                fits[s].add(mlp_input(decoder, r // 2, g, self._width(s)), aim - g - bias)
        return fits

    def solve(self, fits: Mapping[int, DownProjFit]) -> dict[int, FitResult]:
        """Solve each refit against the replica's current ``down_proj`` (refitted weights applied)."""
        return {s: fit.solve(self.down_proj(s).weight[:, :self._width(s)], self.request.ridge) for s, fit in fits.items()}

    # ---- 3. re-score with the refitted weights ----------------------------------------------------------
    def rescore(self, weights: Mapping[int, torch.Tensor]) -> dict[int, float]:
        """Sensitivity of each candidate with the refitted ``down_proj`` of its target (H x w), summed
        over these windows."""
        sens = {s: 0.0 for s in weights}
        for b, rows in enumerate(self.batches):
            for s, weight in weights.items():
                g, o = self._branch(s, b, rows)
                down = self.down_proj(s)
                z = mlp_input(self.decoder, self._target(s) // 2, g, self._width(s))
                sens[s] += _seq_score(o, g + F.linear(z, weight.to(down.weight.device, down.weight.dtype), down.bias),
                                      self.request.metric)
        return sens

    # ---- helpers -----------------------------------------------------------------------------------------
    def _target(self, s: int) -> int:
        return target_block(self.request.mask, self.decoder.arch.num_layers, s)

    def _restore(self, candidates: list[int]) -> dict[int, Mask]:
        """The model each candidate's ``window`` reference runs, for those whose window (candidate to
        target) holds removed blocks; none with the ``current`` reference."""
        if self.request.reference != "window":
            return {}
        mask, layers = self.request.mask, self.decoder.arch.num_layers
        gone = {s: window_removed(mask, layers, s) for s in candidates}
        return {s: restored(mask, blocks) for s, blocks in gone.items() if blocks}

    def down_proj(self, s: int) -> torch.nn.Linear:
        """The ``down_proj`` refitted after candidate ``s`` (that of its target MLP)."""
        return self.decoder.layers[self._target(s) // 2].mlp.down_proj

    def _width(self, s: int) -> int:
        return self.request.mask.mlp_kept(self._target(s) // 2, self.decoder.arch.intermediate_size)

    def _dense_streams(self) -> dict[int, torch.Tensor | Parked]:
        """The dense model's streams on these windows (every block's when they fit; reused by every step)."""
        num_blocks = self.decoder.arch.num_blocks
        every = (tuple(range(num_blocks + 1)) if _fits(self.windows, self.decoder, num_blocks + 1, self.budget)
                 else self.ckpts)
        streams = self._streams()
        dense = dense_streams(self.decoder, self.windows, self.batch_size, self.swap, self.memo, self.window_key,
                              every, self.budget)
        # Keeping the dense streams may have parked this state's checkpoints in the memo: the step lets
        # go of their device copies too (in place: a sharded step's later phases share this dict).
        streams.update({c: t for c, t in self.memo.get(self.window_key, self.key).items() if c in streams})
        return dense

    def _branch(self, s: int, b: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream entering target(s) with s skipped, reference stream after target(s)) of batch b."""
        if (s, b) in self._branches:
            return self._branches[(s, b)]
        decoder, mask, streams, target = self.decoder, self.request.mask, self._streams(), self._target(s)
        c = _nearest(streams, s)
        h = decoder.run(streams[c][rows], mask, c, s)  # stream entering s
        g = decoder.run(h, mask.remove(Block.from_index(s)), s, target)
        # Skipping s may leave g on an earlier device than target(s) (s first on its GPU, or every
        # block between removed): the target MLP, its residual and targets are on target(s)'s device.
        g = g.to(self.down_proj(s).weight.device)
        after = target + 1
        window = self._restore([s])
        if s in window:  # the window run again, its removed blocks included
            o = decoder.run(h, window[s], s, after)
        else:
            o = streams[after][rows] if after in streams else decoder.run(h, mask, s, after)
        if getattr(self, "_keep_branches", False):
            self._branches[(s, b)] = (g, o)
        return g, o
