"""A pruning campaign: the run directory, the search loop, the cache, and the final figures.

Everything a campaign computes goes to the Parquet cache the moment it arrives, keyed by content
(mask, model, calibration windows). A campaign that is rerun, after a crash or with a larger target,
replays its searcher against the cache and only evaluates what was never evaluated.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from search_spaces import Arch, Mask, dense_params, mask_key, param_count, ratio

from .dispatch import Dispatcher, Task, balanced_chunks
from .report import write_report
from .search import Searcher, make_searcher
from .search.base import rank_value
from .storage import RunStorage

if TYPE_CHECKING:
    import numpy as np

    from .config import Config

log = logging.getLogger("rayprune")


class RunDirectoryBusy(RuntimeError):
    """Another driver holds this run directory."""


@dataclass
class Counters:
    evaluated: int = 0  # masks scored by an evaluator in this session
    cached: int = 0  # masks answered from the cache
    failed: int = 0  # masks given up after max_attempts
    seconds: float = 0.0


@dataclass
class CampaignResult:
    run_dir: Path
    searcher: Searcher
    heldout: dict[str, float]
    counters: Counters
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a dot-file, then ``os.replace``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class Campaign:
    """One campaign in one run directory. ``run()`` does everything; the pieces are public for tests."""

    def __init__(self, config: Config, *, progress: bool = True, evaluator_cls: type | None = None) -> None:
        self.config = config
        self.evaluator_cls = evaluator_cls
        self.storage = RunStorage(config.output)  # a path, or a URI mirrored from a local staging directory
        self.run_dir = self.storage.local
        self.progress = progress
        self.counters = Counters()
        self._lock_file = None

    # ---- preparation (no Ray) ---------------------------------------------------------------------
    def lock(self) -> None:
        """Refuse to share the run directory with a second driver."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.run_dir / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(
                f"{self.run_dir} is in use by another rayprune driver; wait for it to finish, or "
                f"set output= to another directory"
            ) from None
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def unlock(self) -> None:
        """Free the run directory for the next driver (``run()`` does this when it returns or fails)."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def prepare_windows(self) -> dict[str, np.ndarray]:
        """Token windows for calibration and held-out evaluation; calibration.parquet is written."""
        from actors.corpus import load_documents
        from actors.models import load_tokenizer, resolve_model
        from actors.windows import read_windows, token_windows, write_windows

        from .config import dump_yaml

        data = self.config.data
        tokenizer = load_tokenizer(resolve_model(self.config.model))
        if data.calibration.windows:
            calibration = read_windows(data.calibration.windows)
        else:
            calibration = token_windows(tokenizer, load_documents(data.corpus, "train"), data.calibration.sequences,
                                        data.calibration.length, data.calibration.seed, what="calibration")
        evaluation = token_windows(tokenizer, load_documents(data.corpus, "test"), data.evaluation.sequences,
                                   data.evaluation.length, data.evaluation.seed, what="evaluation")
        dump_yaml(self.config, self.run_dir / "config.yaml")
        write_windows(self.run_dir / "calibration.parquet", calibration)
        return {"calibration": calibration, "evaluation": evaluation}

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> CampaignResult:
        """Lock the run directory, run the search (resuming from the cache), write every output."""
        self.lock()
        try:
            with self.storage:  # a URI output: pull to resume, mirror while running and at the end
                return self._run()
        finally:
            self.unlock()

    def _run(self) -> CampaignResult:
        from actors.models import read_model_config
        from actors.windows import windows_fingerprint
        from cluster.placement import PlacementError, free_replica_slots
        from cluster.session import connect, start_evaluators

        from .cache import EvalCache

        t0 = time.perf_counter()
        self.arch = Arch.from_hf_config(read_model_config(self.config.model))
        windows = self.prepare_windows()
        self.fingerprints = {name: windows_fingerprint(w) for name, w in windows.items()}
        self.cache = EvalCache(self.run_dir / "evals", flush_every=None)  # flushed once per finished task
        cluster = self.config.cluster
        fixed = isinstance(cluster.actors, int)
        started = connect(num_cpus=max(1, math.ceil(cluster.actors * cluster.cpus_per_actor)) if fixed else os.cpu_count())
        actors = None
        try:
            n_actors = cluster.actors if fixed else free_replica_slots(cluster.cpus_per_actor, cluster.gpus_per_actor)
            if n_actors < 1:
                raise PlacementError(f"cluster.actors=auto found no free slot for a replica of "
                                     f"{cluster.cpus_per_actor} CPU / {cluster.gpus_per_actor} GPU; free resources "
                                     f"or lower cluster.cpus_per_actor / cluster.gpus_per_actor")
            actors = start_evaluators(n_actors, cluster.cpus_per_actor, cluster.gpus_per_actor,
                                      placement_timeout_s=cluster.placement_timeout_s,
                                      evaluator_cls=self.evaluator_cls, model=self.config.model, windows=windows,
                                      batch_size=self.config.search.batch_size)
            import ray

            infos = ray.get([a.info.remote() for a in actors])
            self.model_fingerprint = infos[0]["model_fingerprint"]
            if any(i["model_fingerprint"] != self.model_fingerprint for i in infos):
                raise RuntimeError("evaluator replicas loaded different weights; check the model path on every node")
            log.info("%d evaluator(s) ready: %s", len(actors), ", ".join(i["worker"] for i in infos))
            self.dispatcher = Dispatcher(actors, timeout_s=cluster.eval_timeout_s, max_attempts=cluster.max_attempts)
            if self.config.search.method == "sprint":  # one remote step at a time: orchestrator/sprint_campaign.py
                from .sprint_campaign import run_sprint

                return run_sprint(self, actors, t0)  # writes the outputs; the finally below still cleans up
            searcher = make_searcher(self.config.search, self.arch, run_dir=self.run_dir, pool_size=len(actors),
                                     known=self.known_scores())
            logged = 0
            while (proposal := searcher.suggest()) is not None:
                scores = self.score(proposal.masks, proposal.base, "calibration", proposal.label)
                searcher.observe(scores)
                for s in searcher.path[logged:]:  # steps new since the last batch
                    what = f"Optuna trial {s.layer}" if s.kind == "trial" else f"remove {s.kind} {s.layer}"
                    log.info("step %d: %s -> ppl %.3f, ratio %.4f", s.step, what, s.ppl, s.ratio)
                logged = len(searcher.path)
            final = searcher.current
            references = getattr(searcher, "references", dict)()  # e.g. Optuna's greedy mask, for comparison
            held = self.score([Mask(), final, *references.values()], Mask(), "evaluation", "held-out")
            heldout = {"dense_ppl": held[Mask()], "pruned_ppl": held[final],
                       **{f"{name}_ppl": held[mask] for name, mask in references.items()}}
        finally:
            self.cache.compact()  # flushes, then merges this run's parts into one
            if actors is not None and not started:  # a shared Ray outlives us: free what we took
                actors.shutdown()
            if started:
                import ray

                ray.shutdown()
        self.counters.seconds = time.perf_counter() - t0
        result = CampaignResult(self.run_dir, searcher, heldout, self.counters, self.counters.seconds)
        self.write_outputs(result)
        return result

    def score(self, masks: Sequence[Mask], base: Mask | None, window_set: str, label: str) -> dict[Mask, float]:
        """Perplexity of every mask: from the cache where present, else from the evaluators."""
        from tqdm import tqdm

        scores: dict[Mask, float] = {}
        todo: list[Mask] = []
        for mask in dict.fromkeys(masks):
            row = self.cache.get(self._key(mask, window_set))
            if row is not None:
                scores[mask] = row["ppl"]
                self.counters.cached += 1
            else:
                todo.append(mask)
        # A bar on a terminal; one log line per result where nobody watches a bar (ray job logs, CI).
        bar_on = self.progress and sys.stderr.isatty()
        bar = tqdm(total=len(scores) + len(todo), initial=len(scores), desc=label, unit="mask",
                   disable=not bar_on, leave=True)
        total = len(scores) + len(todo)
        if scores:
            log.info("%s: %d of %d masks served from the cache", label, len(scores), total)
        for outcome in self.dispatcher.run(self._tasks(todo, base, window_set)):
            results = []
            for mask_json, row in zip(outcome.task.masks, outcome.rows or [None] * len(outcome.task.masks)):
                mask = Mask.from_json(mask_json)
                scores[mask] = self._record(mask, window_set, row, outcome.error)
                results.append(scores[mask])
            self.cache.flush()
            bar.update(len(outcome.task.masks))
            if not bar_on:
                worker = (outcome.rows or [{}])[0].get("worker", "-")
                log.info("%s: %d masks from %s, best ppl %.3f (%d/%d done)%s", label, len(results), worker,
                         min(results, key=rank_value), len(scores), total,
                         f"; FAILED: {outcome.error}" if outcome.error else "")
        bar.close()
        return scores

    def known_scores(self) -> dict[Mask, float]:
        """Calibration perplexity of every mask the cache holds for this model and these windows."""
        fingerprints = (self.model_fingerprint, self.fingerprints["calibration"])
        return {Mask.from_json(r["mask_json"]): r["ppl"] for r in self.cache.rows()
                if (r["model_fp"], r["calibration_fp"]) == fingerprints}

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

    def _key(self, mask: Mask, window_set: str) -> str:
        return mask_key(mask, self.model_fingerprint, self.fingerprints[window_set])

    def _record(self, mask: Mask, window_set: str, row: dict | None, error: str | None) -> float:
        if row is None:
            self.counters.failed += 1
            ppl, nll, tokens, seconds, worker = math.nan, math.nan, 0, 0.0, ""
        else:
            self.counters.evaluated += 1
            nll, tokens, seconds, worker = row["nll_sum"], row["tokens"], row["seconds"], row["worker"]
            ppl = _perplexity(nll, tokens)
        self.cache.add({
            "key": self._key(mask, window_set), "mask_json": mask.to_json(),
            "model_fp": self.model_fingerprint, "calibration_fp": self.fingerprints[window_set],
            "nll_sum": nll, "tokens": tokens, "ppl": ppl,
            "params_kept": param_count(mask, self.arch), "ratio": ratio(mask, self.arch),
            "latency_est": None, "seconds": seconds, "worker": worker, "time": time.time(),
            "status": "ok" if row is not None else "failed", "error": error,
        })
        return ppl

    # ---- outputs ----------------------------------------------------------------------------------
    def write_outputs(self, result: CampaignResult) -> None:
        from search_spaces.pruning_config import mask_to_pruning_config

        searcher = result.searcher
        path = {
            "dense_ppl": searcher.dense_ppl,
            "dense_params": dense_params(self.arch),
            "target_ratio": self.config.search.target_ratio,
            "steps": [s.to_dict() for s in searcher.path],
            "heldout": result.heldout,
            "evaluations": {"evaluated": self.counters.evaluated, "cached": self.counters.cached,
                            "failed": self.counters.failed},
            "seconds": result.wall_seconds,
            "arch": dataclasses.asdict(self.arch),  # dense widths, for the report's mask picture
        }
        path.update(result.extra.get("path", {}))  # method-specific figures (SPRINT: speedup, latency table)
        write_json(self.run_dir / "path.json", path)
        write_json(self.run_dir / "pruning_config.json", mask_to_pruning_config(searcher.current, self.arch))
        if hasattr(searcher, "summary"):  # what a whole-mask search found (Optuna: every trial)
            write_json(self.run_dir / "search.json", searcher.summary())
        if self.config.export:
            from actors.export import export_compact

            export_compact(self.config.model, searcher.current, self.run_dir / "model", **result.extra.get("export", {}))
            log.info("compact model written to %s", self.run_dir / "model")
        write_report(self.run_dir)


def _perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean NLL); NaN/inf NLLs stay NaN/inf (they are data, ranked last by the searchers)."""
    if tokens <= 0 or not math.isfinite(nll_sum):
        return math.nan if tokens <= 0 or math.isnan(nll_sum) else math.inf
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf
