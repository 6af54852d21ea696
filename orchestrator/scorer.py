"""Scores for searchers: from the cache where present, else from the evaluator pool, always recorded.

The one path from a mask to its perplexity, shared by every campaign (greedy, Optuna, SPRINT) and
by ``rayprune tune``'s trials: look the mask up in the Parquet cache (keyed by content: mask, model
fingerprint, windows fingerprint), tile what is missing into tasks of similar cost, dispatch them,
and write every result to the cache the moment it arrives, failures included (NaN perplexity, the
error kept). A failed mask is data, ranked last; a batch whose every mask failed stops the run with
the first error (:class:`EveryMaskFailed`). The counters say what this session ran, served and lost.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from search_spaces import Arch, Mask, mask_key, param_count, perplexity, rank_value, ratio

from .dispatch import Dispatcher, Task, balanced_chunks

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

    def to_dict(self) -> dict[str, int]:
        return {"evaluated": self.evaluated, "cached": self.cached, "failed": self.failed}


class Scorer:
    """Perplexities of masks on named window sets (``calibration``, ``evaluation``, ...)."""

    def __init__(self, cache: EvalCache, dispatcher: Dispatcher, arch: Arch, model_fingerprint: str,
                 fingerprints: dict[str, str], *, progress: bool = False) -> None:
        self.cache, self.dispatcher, self.arch = cache, dispatcher, arch
        self.model_fingerprint, self.fingerprints = model_fingerprint, fingerprints
        self.progress = progress
        self.counters = Counters()

    def key(self, mask: Mask, window_set: str, model_fingerprint: str | None = None) -> str:
        return mask_key(mask, model_fingerprint or self.model_fingerprint, self.fingerprints[window_set])

    def cached(self, mask: Mask, window_set: str, model_fingerprint: str | None = None) -> float | None:
        """The cached perplexity of ``mask`` (counted as served), or None."""
        row = self.cache.get(self.key(mask, window_set, model_fingerprint),
                             model_fp=model_fingerprint or self.model_fingerprint,
                             calibration_fp=self.fingerprints[window_set])
        if row is None:
            return None
        self.counters.cached += 1
        return row["ppl"]

    def known(self, window_set: str = "calibration") -> dict[Mask, float]:
        """Perplexity of every mask the cache holds for this model and these windows."""
        fingerprints = (self.model_fingerprint, self.fingerprints[window_set])
        return {Mask.from_json(r["mask_json"]): r["ppl"] for r in self.cache.rows()
                if (r["model_fp"], r["calibration_fp"]) == fingerprints}

    def score(self, masks: Sequence[Mask], base: Mask | None, window_set: str, label: str) -> dict[Mask, float]:
        """Perplexity of every mask: from the cache where present, else from the evaluators."""
        from tqdm import tqdm

        scores: dict[Mask, float] = {}
        todo: list[Mask] = []
        keys = {mask: self.key(mask, window_set) for mask in masks}  # each mask keyed once
        for mask, key in keys.items():
            row = self.cache.get(key, model_fp=self.model_fingerprint, calibration_fp=self.fingerprints[window_set])
            if row is None:
                todo.append(mask)
            else:
                scores[mask] = row["ppl"]
                self.counters.cached += 1
        total = len(scores) + len(todo)
        # A bar on a terminal; one log line per result where nobody watches a bar (ray job logs, CI).
        bar_on = self.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=len(scores), desc=label, unit="mask", disable=not bar_on, leave=True)
        if scores:
            log.info("%s: %d of %d masks served from the cache", label, len(scores), total)
        by_json = {mask.to_json(): mask for mask in todo}
        errors: list[str] = []
        for outcome in self.dispatcher.run(self._tasks(todo, base, window_set)):
            if outcome.error is not None:
                errors += [outcome.error] * len(outcome.task.masks)
            results = []
            for mask_json, row in zip(outcome.task.masks, outcome.rows or [None] * len(outcome.task.masks)):
                mask = by_json[mask_json]
                scores[mask] = self.record(mask, window_set, row, outcome.error, key=keys[mask])
                results.append(scores[mask])
            self.cache.flush()
            bar.update(len(outcome.task.masks))
            if not bar_on:
                worker = (outcome.rows or [{}])[0].get("worker", "-")
                log.info("%s: %d masks from %s, best ppl %.3f (%d/%d done)%s", label, len(results), worker,
                         min(results, key=rank_value), len(scores), total,
                         f"; FAILED: {outcome.error}" if outcome.error else "")
        bar.close()
        if total >= 2 and len(errors) == total:
            raise EveryMaskFailed(f"{label}: all {total} masks failed to evaluate, so there is nothing to decide "
                                  f"on (a search would otherwise go on with NaN scores); the first error: "
                                  f"{errors[0]}. They are recorded in the cache as failed and are tried again "
                                  f"on a rerun: fix the cause (the evaluators' Ray logs say more) and rerun")
        return scores

    def _tasks(self, masks: list[Mask], base: Mask | None, window_set: str) -> list[Task]:
        """Chunks of masks of similar cost, masks ordered by where they leave the base."""
        num_blocks = self.arch.num_blocks
        if base is None:
            starts = [0] * len(masks)
        else:
            starts = [base.first_difference(m, self.arch.num_layers) for m in masks]
            starts = [num_blocks if s is None else s for s in starts]
        order = sorted(range(len(masks)), key=lambda i: starts[i])
        costs = [num_blocks - starts[i] + 1 for i in order]
        n_chunks = 1 if len(self.dispatcher.actors) == 1 else 2 * len(self.dispatcher.actors)
        base_json = None if base is None else base.to_json()
        return [Task(window_set, [masks[order[i]].to_json() for i in chunk], base_json)
                for chunk in balanced_chunks(costs, n_chunks)]

    def record(self, mask: Mask, window_set: str, row: dict[str, Any] | None, error: str | None, *,
               model_fingerprint: str | None = None, latency: float | None = None, count: bool = True,
               key: str | None = None) -> float:
        """Write one evaluation (``row``: nll_sum, tokens, seconds, worker; None: failed) to the
        cache and count it (unless the caller counted it already); returns its perplexity.
        ``model_fingerprint`` overrides the model's (SPRINT: the model with its refitted weights)."""
        if row is None:
            self.counters.failed += count
            ppl, nll, tokens, seconds, worker = math.nan, math.nan, 0, 0.0, ""
        else:
            self.counters.evaluated += count
            nll, tokens, seconds, worker = row["nll_sum"], row["tokens"], row.get("seconds"), row.get("worker")
            ppl = perplexity(nll, tokens)
        model_fp = model_fingerprint or self.model_fingerprint
        self.cache.add({
            "key": key or self.key(mask, window_set, model_fp), "mask_json": mask.to_json(),
            "model_fp": model_fp, "calibration_fp": self.fingerprints[window_set],
            "nll_sum": nll, "tokens": tokens, "ppl": ppl,
            "params_kept": param_count(mask, self.arch), "ratio": ratio(mask, self.arch),
            "latency_est": latency, "seconds": seconds, "worker": worker, "time": time.time(),
            "status": "ok" if row is not None else "failed", "error": error,
        })
        return ppl
