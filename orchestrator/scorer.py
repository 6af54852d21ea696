"""Scores for searchers: from the cache where present, else from the evaluator pool, always recorded.

The one path from a mask to its perplexity, shared by every campaign (greedy, Optuna, SPRINT) and
by ``rayprune tune``'s trials: look the mask up in the Parquet cache (keyed by content: mask, model
fingerprint, windows fingerprint), tile what is missing into tasks of similar cost, dispatch them,
and write every result to the cache the moment it arrives, failures included (NaN perplexity, the
error kept).

A tile is a chunk of masks on a shard of the windows. A score is a sum over windows (NLL sums and
token counts add up), so when a batch has fewer mask chunks than two per replica (a step with few
candidates, the dense model, held-out scores), the windows are cut into shards at batch boundaries
until there are at least two tiles per replica (:func:`window_shards`): every replica works while any
work is queued. A mask's shards are added up in float64 (exactly rounded, so in any order) into one
cache row; a mask with a shard that failed for good is a failed mask.

A failed mask is data, ranked last; a batch whose every mask failed stops the run with the first
error (:class:`EveryMaskFailed`). The counters say what this session ran, served and lost.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from search_spaces import Arch, Mask, mask_key, param_count, perplexity, rank_value, ratio

from search_spaces.tiling import balanced_chunks, window_shards

from .dispatch import Dispatcher, Outcome, Task

if TYPE_CHECKING:
    from .cache import EvalCache

log = logging.getLogger("rayprune")


class EveryMaskFailed(RuntimeError):
    """Every mask of a batch failed to evaluate (not NaN scores: errors); the campaign stops."""


@dataclass
class Counters:
    evaluated: int = 0  # masks scored by an evaluator in this session
    cached: int = 0  # masks answered from the cache
    failed: int = 0  # masks given up after max_attempts
    seconds: float = 0.0
    tokens_evaluated: int = 0  # tokens of the rows the evaluators computed in this session
    tokens_cached: int = 0  # tokens of the rows served from the cache (computed by an earlier run)
    # tokens of the rows used (computed or served) per window set: calibration, evaluation, ...
    tokens_by_set: dict[str, int] = field(default_factory=dict)
    # keys of the rows counted so far: a row read again (a racing round re-reading the windows of the
    # rounds before it) is answered again but its tokens count once
    _rows: set[str] = field(default_factory=set, repr=False, compare=False)

    def served(self, row: Mapping[str, Any], window_set: str, key: str | None = None) -> None:
        """Count one row of ``window_set`` (a segment's: the set it is cut from) served from the cache."""
        self.cached += 1
        if self._first(key or row.get("key")):
            self.tokens_cached += self._used(int(row.get("tokens") or 0), window_set)

    def computed(self, tokens: int, window_set: str, key: str | None = None) -> None:
        """Count the tokens of one row of ``window_set`` an evaluator computed."""
        if self._first(key):
            self.tokens_evaluated += self._used(tokens, window_set)

    def _first(self, key: str | None) -> bool:
        """Whether row ``key`` has not been counted yet (None: a row without a key, always counted)."""
        if key is None:
            return True
        if key in self._rows:
            return False
        self._rows.add(key)
        return True

    def _used(self, tokens: int, window_set: str) -> int:
        self.tokens_by_set[window_set] = self.tokens_by_set.get(window_set, 0) + tokens
        return tokens

    @property
    def tokens(self) -> int:
        """Tokens of every row the campaign used: its compute, whichever run did it."""
        return self.tokens_evaluated + self.tokens_cached

    def to_dict(self) -> dict[str, Any]:
        return {"evaluated": self.evaluated, "cached": self.cached, "failed": self.failed,
                "tokens_evaluated": self.tokens_evaluated, "tokens_cached": self.tokens_cached,
                "tokens_by_set": dict(self.tokens_by_set)}


class MaskShards:
    """Collects the tiles of a batch as they come back; a mask is done once every tile holding it
    answered: its rows added up, or failed if any of them failed (all or nothing per mask)."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.expected = Counter(mask for task in tasks for mask in task.masks)
        self.parts: dict[str, list[tuple[tuple[int, int] | None, dict[str, Any] | None, str | None]]] = {}

    def add(self, outcome: Outcome) -> list[tuple[str, dict[str, Any] | None, str | None]]:
        """``(mask JSON, row or None, error or None)`` of every mask that ``outcome`` completed."""
        done = []
        rows = outcome.rows or [None] * len(outcome.task.masks)
        for mask, row in zip(outcome.task.masks, rows):
            parts = self.parts.setdefault(mask, [])
            parts.append((outcome.task.rows, row, outcome.error if row is None else None))
            if len(parts) == self.expected[mask]:
                done.append((mask, *combine_shards(self.parts.pop(mask))))
        return done


def combine_shards(parts: Sequence[tuple[tuple[int, int] | None, dict[str, Any] | None, str | None]]
                   ) -> tuple[dict[str, Any] | None, str | None]:
    """One mask's row from its shards' ``(rows, row, error)``: NLL sums and seconds added in float64
    with ``math.fsum`` (exactly rounded: the arrival order cannot change a bit), token counts added,
    workers listed; ``(None, error)`` if a shard failed."""
    if len(parts) == 1:
        return parts[0][1], parts[0][2]
    failed = [(rows, error) for rows, row, error in parts if row is None]
    if failed:
        return None, "; ".join(f"windows {rows[0]}-{rows[1]}: {error}" if rows else str(error)
                               for rows, error in failed)
    rows = [row for _, row, _ in sorted(parts, key=lambda p: (p[0] or (0, 0))[0])]
    return {"nll_sum": math.fsum(float(r["nll_sum"]) for r in rows), "tokens": sum(int(r["tokens"]) for r in rows),
            "seconds": math.fsum(float(r.get("seconds") or 0.0) for r in rows),
            "worker": ",".join(dict.fromkeys(str(r.get("worker")) for r in rows))}, None


class Scorer:
    """Perplexities of masks on named window sets (``calibration``, ``evaluation``, ...).

    ``window_shapes`` (``{name: (windows, tokens per window)}``, e.g. ``{n: w.shape for n, w in
    windows.items()}``) and ``batch_size`` (the engine's, ``search.batch_size``) let it cut window
    shards and tell the dispatcher each task's tokens; without them every task covers all windows.
    """

    def __init__(self, cache: EvalCache, dispatcher: Dispatcher, arch: Arch, model_fingerprint: str,
                 fingerprints: dict[str, str], *, progress: bool = False,
                 window_shapes: Mapping[str, Sequence[int]] | None = None, batch_size: int | None = None) -> None:
        self.cache, self.dispatcher, self.arch = cache, dispatcher, arch
        self.model_fingerprint, self.fingerprints = model_fingerprint, fingerprints
        self.progress = progress
        self.window_shapes = {name: (int(shape[0]), int(shape[1])) for name, shape in (window_shapes or {}).items()}
        self.batch_size = batch_size
        self.counters = Counters()
        self.segments: dict[str, tuple[str, int, int]] = {}  # virtual window set -> (window set, start, stop)

    def key(self, mask: Mask, window_set: str, model_fingerprint: str | None = None) -> str:
        return mask_key(mask, model_fingerprint or self.model_fingerprint, self.fingerprints[window_set])

    def cached(self, mask: Mask, window_set: str, model_fingerprint: str | None = None) -> float | None:
        """The cached perplexity of ``mask`` (counted as served), or None."""
        row = self.cache.get(self.key(mask, window_set, model_fingerprint),
                             model_fp=model_fingerprint or self.model_fingerprint,
                             calibration_fp=self.fingerprints[window_set])
        if row is None:
            return None
        self.counters.served(row, self.parent_set(window_set))
        return row["ppl"]

    def known(self, window_set: str = "calibration", fitness: str = "ppl") -> dict[Mask, float]:
        """Perplexity (or a KL fitness's exp(mean KL)) of every mask the cache holds for this model
        and these windows."""
        fingerprints = (self.fitness_fingerprint(fitness), self.fingerprints[window_set])
        return {Mask.from_json(r["mask_json"]): r["ppl"] for r in self.cache.rows()
                if (r["model_fp"], r["calibration_fp"]) == fingerprints}

    def score(self, masks: Sequence[Mask], base: Mask | None, window_set: str, label: str,
              fitness: str = "ppl") -> dict[Mask, float]:
        """Perplexity of every mask: from the cache where present, else from the evaluators.

        ``fitness`` (``search_spaces.scores.fitness_tag``): ``ppl``, or ``kl``/``kl:<K>``, whose
        "perplexity" is exp(mean KL(dense || mask)) and whose rows are keyed by the model
        fingerprint with ``+kl...`` added, so the two never stand for each other."""
        from tqdm import tqdm

        model_fp = self.fitness_fingerprint(fitness)
        scores: dict[Mask, float] = {}
        todo: list[Mask] = []
        keys = {mask: self.key(mask, window_set, model_fp) for mask in masks}  # each mask keyed once
        for mask, key in keys.items():
            row = self.cache.get(key, model_fp=model_fp, calibration_fp=self.fingerprints[window_set])
            if row is None:
                todo.append(mask)
            else:
                scores[mask] = row["ppl"]
                self.counters.served(row, self.parent_set(window_set))
        total = len(scores) + len(todo)
        # A bar on a terminal; one log line per result where nobody watches a bar (ray job logs, CI).
        bar_on = self.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=len(scores), desc=label, unit="mask", disable=not bar_on, leave=True)
        if scores:
            log.info("%s: %d of %d masks served from the cache", label, len(scores), total)
        by_json = {mask.to_json(): mask for mask in todo}
        errors: list[str] = []
        tasks = self._tasks(todo, base, window_set, fitness)
        shards = MaskShards(tasks)
        for outcome in self.dispatcher.run(tasks):
            done = shards.add(outcome)
            if not done:  # a shard of masks whose other shards are still out
                continue
            results = []
            for mask_json, row, error in done:
                mask = by_json[mask_json]
                if row is None:
                    errors.append(error or "unknown error")
                scores[mask] = self.record(mask, window_set, row, error, key=keys[mask], model_fingerprint=model_fp)
                results.append(scores[mask])
            self.cache.flush()
            bar.update(len(done))
            if not bar_on:
                worker = (done[0][1] or {}).get("worker", "-")
                failed = next((error for _, row, error in done if row is None), None)
                log.info("%s: %d masks from %s, best ppl %.3f (%d/%d done)%s", label, len(results), worker,
                         min(results, key=rank_value), len(scores), total, f"; FAILED: {failed}" if failed else "")
        bar.close()
        if total >= 2 and len(errors) == total:
            raise EveryMaskFailed(f"{label}: all {total} masks failed to evaluate, so there is nothing to decide "
                                  f"on (a search would otherwise go on with NaN scores); the first error: "
                                  f"{errors[0]}. They are recorded in the cache as failed and are tried again "
                                  f"on a rerun: fix the cause (the evaluators' Ray logs say more) and rerun")
        return scores

    # ---- fidelity levels: scores on a prefix of the windows, cached segment by segment ------------------
    def segment(self, window_set: str, start: int, stop: int) -> str:
        """The virtual window set of windows ``[start, stop)`` of ``window_set``: scored like any set,
        cached under its own windows fingerprint (derived from the set's, content-addressed too)."""
        import hashlib

        n_windows, length = self.window_shapes[window_set]
        if not 0 <= start < stop <= n_windows:
            raise ValueError(f"windows [{start}, {stop}) are not a range of {window_set!r}, which holds {n_windows}")
        name = f"{window_set}[{start}:{stop}]"
        if name not in self.segments:
            self.segments[name] = (window_set, start, stop)
            self.window_shapes[name] = (stop - start, length)
            digest = hashlib.sha256(f"{self.fingerprints[window_set]}[{start}:{stop}]".encode()).hexdigest()
            self.fingerprints[name] = f"{digest[:32]}"
        return name

    def levels(self, window_set: str, cuts: Sequence[int]) -> list[tuple[int, int]]:
        """The segments of fidelity levels ``cuts`` (window counts; the last level is every window),
        each cut rounded up to a whole batch: ``[(0, c1), (c1, c2), ..., (ck, n)]``."""
        n_windows = self.window_shapes[window_set][0]
        batch = self.batch_size or 1
        ends = sorted({min(n_windows, -(-int(c) // batch) * batch) for c in cuts if c} | {n_windows})
        return list(zip([0, *ends[:-1]], ends))

    def score_upto(self, masks: Sequence[Mask], base: Mask | None, window_set: str, upto: int | None,
                   cuts: Sequence[int], label: str, fitness: str = "ppl") -> dict[Mask, float]:
        """Perplexity of every mask on the first ``upto`` windows of ``window_set`` (None: all), from
        the segments of ``levels(window_set, cuts)`` that reach it: a segment scored before (this run
        or an earlier one) is read from the cache and never forwarded again, and a score on few windows
        never stands for one on more. ``upto`` is rounded up to a whole batch, like the cuts. On every
        window, a mask already scored on the whole set (by an exact search: a greedy step, a warm
        start) is read from that row, not forwarded again segment by segment."""
        n_windows, batch = self.window_shapes[window_set][0], self.batch_size or 1
        end = n_windows if upto is None else min(n_windows, -(-int(upto) // batch) * batch)
        segments = self.levels(window_set, [*cuts, end])
        names = [self.segment(window_set, a, b) for a, b in segments if b <= end]
        model_fp, out = self.fitness_fingerprint(fitness), {}
        whole: dict[Mask, float] = {}
        if end == n_windows:
            for mask in dict.fromkeys(masks):
                if (ppl := self.cached(mask, window_set, model_fp)) is not None:
                    whole[mask] = ppl
        rest = [mask for mask in masks if mask not in whole]
        for name in names if rest else ():
            self.score(rest, base, name, f"{label} ({name})", fitness)
        for mask in masks:
            if mask in whole:
                out[mask] = whole[mask]
                continue
            rows = [self.cache.get(self.key(mask, name, model_fp), model_fp=model_fp,
                                   calibration_fp=self.fingerprints[name]) for name in names]
            if any(r is None or r.get("status") != "ok" for r in rows):
                out[mask] = math.nan
            else:
                out[mask] = perplexity(math.fsum(r["nll_sum"] for r in rows), sum(int(r["tokens"]) for r in rows))
        return out

    def parent_set(self, window_set: str) -> str:
        """The window set a segment is cut from (a set that is no segment: itself)."""
        return self.segments.get(window_set, (window_set,))[0]

    def fitness_fingerprint(self, fitness: str = "ppl") -> str:
        """The model fingerprint a fitness's rows are keyed by: the model's, ``+kl...`` for KL."""
        return self.model_fingerprint if fitness == "ppl" else f"{self.model_fingerprint}+{fitness}"

    def _tasks(self, masks: list[Mask], base: Mask | None, window_set: str, fitness: str = "ppl") -> list[Task]:
        """Tiles: chunks of masks of similar cost (masks ordered by where they leave the base), each
        on every window shard (:func:`window_shards`), the shards of a chunk one after another."""
        num_blocks = self.arch.num_blocks
        if base is None:
            starts = [0] * len(masks)
        else:
            starts = [base.first_difference(m, self.arch.num_layers) for m in masks]
            starts = [num_blocks if s is None else s for s in starts]
        order = sorted(range(len(masks)), key=lambda i: starts[i])
        costs = [num_blocks - starts[i] + 1 for i in order]
        n_actors = len(self.dispatcher.actors)
        chunks = balanced_chunks(costs, 1 if n_actors == 1 else 2 * n_actors)
        base_json = None if base is None else base.to_json()
        evaluated = self.parent_set(window_set)  # a segment is evaluated on its set's rows
        return [Task(evaluated, [masks[order[i]].to_json() for i in chunk], base_json, rows=rows, tokens=tokens,
                     fitness=fitness)
                for chunk in chunks for rows, tokens in self._shards(window_set, len(chunks), n_actors)]

    def _shards(self, window_set: str, n_chunks: int, n_actors: int) -> list[tuple[tuple[int, int] | None, int | None]]:
        """``(rows, tokens per mask)`` of each window shard of ``window_set``; rows None: all windows."""
        if window_set not in self.window_shapes:
            return [(None, None)]
        n_windows, length = self.window_shapes[window_set]
        ranges = window_shards(n_windows, self.batch_size or n_windows, n_chunks, n_actors)
        predicted = length - 1  # tokens predicted per window
        if window_set in self.segments:  # a segment: its shards are rows of the set it is cut from
            offset = self.segments[window_set][1]
            return [((offset + start, offset + stop), (stop - start) * predicted) for start, stop in ranges]
        if len(ranges) == 1:
            return [(None, n_windows * predicted)]
        return [((start, stop), (stop - start) * predicted) for start, stop in ranges]

    def record(self, mask: Mask, window_set: str, row: dict[str, Any] | None, error: str | None, *,
               model_fingerprint: str | None = None, latency: float | None = None, count: bool = True,
               key: str | None = None) -> float:
        """Write one evaluation (``row``: nll_sum, tokens, seconds, worker; None: failed) to the
        cache and count it (unless the caller counted it already); returns its perplexity.
        ``model_fingerprint`` overrides the model's (SPRINT: the model with its refitted weights)."""
        model_fp = model_fingerprint or self.model_fingerprint
        key = key or self.key(mask, window_set, model_fp)
        if row is None:
            self.counters.failed += count
            ppl, nll, tokens, seconds, worker = math.nan, math.nan, 0, 0.0, ""
        else:
            self.counters.evaluated += count
            if count:
                self.counters.computed(int(row["tokens"]), self.parent_set(window_set), key)
            nll, tokens, seconds, worker = row["nll_sum"], row["tokens"], row.get("seconds"), row.get("worker")
            ppl = perplexity(nll, tokens)
        self.cache.add({
            "key": key, "mask_json": mask.to_json(),
            "model_fp": model_fp, "calibration_fp": self.fingerprints[window_set],
            "nll_sum": nll, "tokens": tokens, "ppl": ppl,
            "params_kept": param_count(mask, self.arch), "ratio": ratio(mask, self.arch),
            "latency_est": latency, "seconds": seconds, "worker": worker, "time": time.time(),
            "status": "ok" if row is not None else "failed", "error": error,
        })
        return ppl
