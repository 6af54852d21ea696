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
   sensitivity is ``sum over sequences |o - c| / |o|`` (o: stream kept, c: stream of the branch);
2. rank by ``sensitivity / latency saved``; for the ``top_k`` best refit ``down_proj`` of
   ``target(s)`` so that the pruned model reproduces the *dense* stream after it (actors/refit.py);
3. re-score those with their refitted weights and return the best tuned candidate and its weights.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from search_spaces import Block, Mask
from search_spaces.latency import best_candidate
from search_spaces.sprint import (StepRequest, checkpoint_before, checkpoint_blocks, state_key, target_block,
                                  tensor_key, top_candidates)

from .memory import resolve_budget, tensor_bytes
from .refit import DownProjFit

if TYPE_CHECKING:
    from .forward import LeanDecoder

#: Streams kept within a step (entering every block, and the branches of the tuned candidates) up to
#: this many bytes (or the memory budget, when smaller); beyond it they are recomputed from the
#: checkpoints, which are always kept.
STORE_BYTES = 2 << 30


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
def _dense(swap: TunedSwap) -> Iterator[None]:
    """The original weights for a while (dense targets), the refitted ones again afterwards."""
    swap.restore()
    try:
        yield
    finally:
        swap.apply()


def _seq_score(o: torch.Tensor, c: torch.Tensor) -> float:
    """sum over sequences of |o - c| / |o| (Frobenius norms over tokens x hidden per sequence)."""
    # On a replica over k GPUs a branch whose last kept block sits on an earlier device than o's
    # (every block after the candidate removed) arrives there: compare on o's device.
    o, c = o.float().flatten(1), c.to(o.device).float().flatten(1)  # (B, T*H)
    return float(((o - c).norm(dim=1) / o.norm(dim=1).clamp_min(1e-30)).double().sum())


def mlp_input(decoder: LeanDecoder, layer: int, h: torch.Tensor, width: int) -> torch.Tensor:
    """Input of ``down_proj`` of MLP ``layer`` (first ``width`` channels) on stream ``h``: (B, T, w)."""
    module = decoder.layers[layer]
    mlp = module.mlp
    x = module.post_attention_layernorm(h.to(mlp.gate_proj.weight.device))  # (B, T, H)
    bias = (lambda b: None if b is None else b[:width])
    gate = F.linear(x, mlp.gate_proj.weight[:width], bias(mlp.gate_proj.bias))
    return mlp.act_fn(gate) * F.linear(x, mlp.up_proj.weight[:width], bias(mlp.up_proj.bias))


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


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


def _walk_checkpoints(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, mask: Mask,
                      blocks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Streams of ``mask`` entering every checkpoint block, over all windows (the dense memo)."""
    out: dict[int, list[torch.Tensor]] = {c: [] for c in blocks}
    for rows in _batches(windows.shape[0], batch_size):
        h = decoder.embed(windows[rows])
        rope = decoder.rope(h)
        for i in range(max(blocks) + 1):
            if i in out:
                out[i].append(h)
            if i < max(blocks):
                h = decoder.block(i, h, mask, rope)
    return {c: torch.cat(t) for c, t in out.items()}


def run_step(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, request: StepRequest,
             weights: Mapping[str, torch.Tensor], memo: Checkpoints) -> dict[str, Any]:
    """One SPRINT step (see the module docstring); ``weights`` maps content hash -> (H, w) tensor.

    Returns ``nll_sum``/``tokens`` of the request's state on its windows, the new ``sensitivity``
    of every requested candidate, the ``tuned`` re-scores of the top candidates, and ``choice``: the
    best tuned candidate, with ``weight`` (numpy fp32, None when its refit was not kept) and ``sha``.
    The memory budget is ``memo.memory_budget``, else the default of the decoder's devices.
    """
    t0 = time.perf_counter()
    budget = resolve_budget(memo.memory_budget, decoder.model)
    arch, mask, ws = decoder.arch, request.mask, request.window_set
    num_blocks, L = arch.num_blocks, arch.num_layers
    ckpts = checkpoint_blocks(L, request.checkpoint_every)
    key = state_key(mask, request.tuned)
    candidates = sorted(set(request.candidates))
    targets = {s: target_block(mask, L, s) for s in candidates}
    gone = [s for s in [*candidates, *dict(request.known)] if mask.removed(Block.from_index(s))]
    if gone:
        raise ValueError(f"blocks {gone[:5]} are removed in the request's mask; score only blocks it keeps")
    missing = [h for _, h in request.tuned if h not in weights]
    if missing:
        raise ValueError(f"refitted weights {missing[:3]} were not passed; pass every weight the request's tuned names")
    swap = TunedSwap(decoder, {layer: weights[h] for layer, h in request.tuned})
    with torch.inference_mode(), swap:
        # ---- 1. walk from the last usable checkpoint, scoring candidates on the way ------------------
        want = checkpoint_before(candidates[0], ckpts) if candidates else num_blocks
        usable = memo.get(ws, key) or {c: t for c, t in memo.get(ws, request.parent).items()
                                        if c <= request.unchanged_before}
        usable = {c: t for c, t in usable.items() if c <= want}
        start = max(usable, default=0)
        finishing: dict[int, list[int]] = {}
        for s, r in targets.items():
            finishing.setdefault(r, []).append(s)
        sens = {s: 0.0 for s in candidates}
        keep_all = _fits(windows, decoder, num_blocks + 1 - start, budget)  # every entering stream, for the refits
        recorded: dict[int, list[torch.Tensor]] = {c: [] for c in range(start, num_blocks + 1)
                                                   if keep_all or c in ckpts}
        nll_sum, tokens = 0.0, 0
        for rows in _batches(windows.shape[0], batch_size):
            batch = windows[rows]
            h = usable[start][rows] if start in usable else decoder.embed(batch)  # (B, T, H)
            rope = decoder.rope(h)
            branches: dict[int, torch.Tensor] = {}
            for i in range(start, num_blocks):
                if i in recorded:
                    recorded[i].append(h)
                if i in sens:
                    branches[i] = h  # the stream that skips block i
                h_next = decoder.block(i, h, mask, rope)
                for s in branches:
                    if s != i:
                        branches[s] = decoder.block(i, branches[s], mask, rope)
                h = h_next
                for s in finishing.get(i, ()):
                    sens[s] += _seq_score(h, branches.pop(s))
            if num_blocks in recorded:
                recorded[num_blocks].append(h)  # the final stream, i.e. "entering" the end
            nll, n = decoder.nll(h, batch)
            nll_sum, tokens = nll_sum + nll, tokens + n
        streams = {c: t for c, t in usable.items() if c < start} | {c: torch.cat(t) for c, t in recorded.items()}
        del recorded  # the per-batch pieces (copied by cat)
        memo.put(ws, key, {c: t for c, t in streams.items() if c in ckpts}, budget)
        streams |= memo.get(ws, key)  # checkpoints the memo parked leave the device for this step too

        # ---- 2. refit the MLP after each of the best candidates ------------------------------------
        result: dict[str, Any] = {"state": key, "nll_sum": nll_sum, "tokens": tokens, "walk_start": start,
                                  "sensitivity": sens, "top": [], "tuned": [], "choice": None}
        ranked = {**dict(request.known), **sens}
        if request.top_k > 0 and ranked:
            top = top_candidates(ranked, request.costs, request.top_k)
            result["top"] = top
            tuned, choice_weight = _tune(decoder, windows, batch_size, request, top, ranked, streams, swap, memo,
                                         budget)
            result["tuned"] = tuned
            best = best_candidate({t["block"]: t["sensitivity"] for t in tuned}, request.costs)
            chosen = next(t for t in tuned if t["block"] == best)
            weight = choice_weight.get(best)
            sha = None if weight is None else tensor_key(tuple(weight.shape), "float32", weight.tobytes())
            result["choice"] = {**chosen, "sha": sha, "weight": weight}
    result["seconds"] = time.perf_counter() - t0
    return result


def _tune(decoder: LeanDecoder, windows: torch.Tensor, batch_size: int, request: StepRequest, top: list[int],
          ranked: Mapping[int, float], streams: dict[int, torch.Tensor | Parked], swap: TunedSwap,
          memo: Checkpoints, budget: int | None) -> tuple[list[dict[str, Any]], dict[int, Any]]:
    """Refit and re-score the ``top`` candidates; returns their records and the kept weights (numpy)."""
    arch, mask, L = decoder.arch, request.mask, decoder.arch.num_layers
    ckpts = checkpoint_blocks(L, request.checkpoint_every)
    targets = {s: target_block(mask, L, s) for s in top}
    tunable = [s for s in top if targets[s] % 2 == 1 and targets[s] != s
               and not mask.removed(Block.from_index(targets[s]))]
    records = {s: {"block": s, "target": targets[s], "sensitivity": ranked[s], "untuned": ranked[s],
                   "status": "no-mlp", "before": None, "after": None} for s in top}
    if not tunable:
        return [records[s] for s in top], {}
    dense_key = state_key(Mask(), ())
    dense = memo.get(request.window_set, dense_key)
    if not dense:  # every block's stream when it fits (the dense memo is reused by every step)
        every = tuple(range(arch.num_blocks + 1)) if _fits(windows, decoder, arch.num_blocks + 1, budget) else ckpts
        with _dense(swap):
            dense = _walk_checkpoints(decoder, windows, batch_size, Mask(), every)
        memo.put(request.window_set, dense_key, dense, budget)
        dense = memo.get(request.window_set, dense_key)  # some may be parked now
    widths = {s: mask.mlp_kept(targets[s] // 2, arch.intermediate_size) for s in tunable}
    # Each refit lives on its target layer's device (a replica over k GPUs), where z, the targets
    # and the weight it replaces are.
    device = {s: decoder.layers[targets[s] // 2].mlp.down_proj.weight.device for s in tunable}
    fits = {s: DownProjFit(widths[s], arch.hidden_size, device[s]) for s in tunable}
    per_batch = 2 * windows[:1].numel() * arch.hidden_size * decoder.layers[0].mlp.down_proj.weight.element_size()
    keep = per_batch * windows.shape[0] * len(tunable) <= _store_bytes(budget)
    stored: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def branch(s: int, b: int, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream entering target(s) with s skipped, current stream after target(s)) of batch b."""
        if (s, b) in stored:
            return stored[(s, b)]
        c = _nearest(streams, s)
        h = decoder.run(streams[c][rows], mask, c, s)  # stream entering s
        g = decoder.run(h, mask.remove(Block.from_index(s)), s, targets[s])
        # Skipping s may leave g on an earlier device than target(s) (s first on its GPU, or every
        # block between removed): the target MLP, its residual and targets are on target(s)'s device.
        g = g.to(device[s])
        after = targets[s] + 1
        o = streams[after][rows] if after in streams else decoder.run(h, mask, s, after)
        if keep:
            stored[(s, b)] = (g, o)
        return g, o

    batches = _batches(windows.shape[0], batch_size)
    for b, rows in enumerate(batches):
        dense_after: dict[int, torch.Tensor] = {}
        for s in tunable:
            r = targets[s]
            if r not in dense_after:
                with _dense(swap):
                    c = _nearest(dense, r + 1)
                    dense_after[r] = decoder.run(dense[c][rows], Mask(), c, r + 1)  # dense stream after r
            g, _ = branch(s, b, rows)
            down = decoder.layers[r // 2].mlp.down_proj
            bias = 0.0 if down.bias is None else down.bias
            fits[s].add(mlp_input(decoder, r // 2, g, widths[s]), dense_after[r] - g - bias)
    results = {}
    for s in tunable:
        down = decoder.layers[targets[s] // 2].mlp.down_proj
        results[s] = fits[s].solve(down.weight[:, :widths[s]], request.ridge)
        records[s].update(status=results[s].status, before=results[s].before, after=results[s].after)
    for b, rows in enumerate(batches):  # ---- 3. re-score with the refitted weights
        for s in tunable:
            if not results[s].ok:
                continue
            if b == 0:
                records[s]["sensitivity"] = 0.0
            g, o = branch(s, b, rows)
            down = decoder.layers[targets[s] // 2].mlp.down_proj
            z = mlp_input(decoder, targets[s] // 2, g, widths[s])
            c = g + F.linear(z, results[s].weight.to(down.weight.dtype), down.bias)
            records[s]["sensitivity"] += _seq_score(o, c)
    kept = {s: results[s].weight.cpu().numpy() for s in tunable if results[s].ok}
    return [records[s] for s in top], kept
