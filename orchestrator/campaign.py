"""A pruning campaign: lock the run directory, start the pool, run the search, write the outputs.

Everything a campaign computes goes to the Parquet cache the moment it arrives, keyed by content
(mask, model, calibration windows). A campaign that is rerun, after a crash or with a larger target,
replays its searcher against the cache and only evaluates what was never evaluated.

Who does what (docs/ARCHITECTURE.md): the run directory's files belong to
:class:`~orchestrator.rundir.RunDir`, scores come from the :class:`~orchestrator.scorer.Scorer`
(cache, then pool), the pool is started and stopped by :func:`cluster.session.evaluator_pool`, and
the loop that answers a searcher is :func:`~orchestrator.search_run.drive`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import Arch, dense_params

from .report import write_report
from .rundir import RunDir, RunDirectoryBusy
from .scorer import Counters, Scorer
from .search import Searcher
from .search_run import drive, search_run
from .storage import RunStorage

if TYPE_CHECKING:
    import numpy as np

    from actors.permutation import Permutation

    from .config import Config

log = logging.getLogger("rayprune")

__all__ = ["Campaign", "CampaignResult", "Counters", "RunDirectoryBusy"]


@dataclass
class CampaignResult:
    run_dir: Path
    searcher: Searcher
    heldout: dict[str, float]
    counters: Counters
    wall_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class Campaign:
    """One campaign in one run directory. ``run()`` does everything; ``scorer`` is kept for tests."""

    def __init__(self, config: Config, *, progress: bool = True, evaluator_cls: type | None = None) -> None:
        self.config = config
        self.evaluator_cls = evaluator_cls
        self.storage = RunStorage(config.output)  # a path, or a URI mirrored from a local staging directory
        self.rundir = RunDir(self.storage.local)
        self.run_dir = self.rundir.path
        self.progress = progress
        self.scorer: Scorer | None = None
        self.replica_dtype: str | None = None  # the dtype the replicas resolved config.dtype to
        self.permutation: Permutation | None = None  # the channel order the replicas used

    def lock(self) -> None:
        """Refuse to share the run directory with a second driver (``run()`` locks it itself)."""
        self.rundir.lock()

    def unlock(self) -> None:
        self.rundir.unlock()

    def prepare(self) -> tuple[Arch, dict[str, np.ndarray]]:
        """The dense architecture and the window sets; config.yaml and calibration.parquet are written."""
        from actors.models import read_model_config

        from .data.campaign_windows import campaign_windows

        arch = Arch.from_hf_config(read_model_config(self.config.model))
        windows = campaign_windows(self.config)
        if changed := self.rundir.keep_history(self.config):
            log.warning("%s ran before with other settings (%s changed): its earlier path.json and config.yaml "
                        "are kept in %s; the cache is kept too", self.run_dir, ", ".join(changed),
                        self.run_dir / "history")
        self.rundir.write_config(self.config)
        self.rundir.write_calibration(windows["calibration"])
        return arch, windows

    def run(self) -> CampaignResult:
        """Lock the run directory, run the search (resuming from the cache), write every output."""
        with self.rundir, self.storage:  # a URI output: pull to resume, mirror while running and at the end
            result = self._run()
            if self.config.recovery is not None:  # LoRA recovery of the export, on the same Ray session
                from .recover import recover

                recover(self.run_dir, self.config.recovery, progress=self.progress)
            return result

    def _run(self) -> CampaignResult:
        from cluster.session import evaluator_pool

        from .cache import EvalCache
        from .data.windows import windows_fingerprint
        from .dispatch import Dispatcher

        from cluster.replica_size import resolve_gpus_per_actor

        t0 = time.perf_counter()
        config = self.config
        # gpus_per_actor: auto -> k from the model's size on the meta device (no weights read)
        cluster = dataclasses.replace(config.cluster, gpus_per_actor=resolve_gpus_per_actor(config))
        arch, windows = self.prepare()
        fingerprints = {name: windows_fingerprint(w) for name, w in windows.items()}
        cache = EvalCache(self.rundir.evals, flush_every=None)  # flushed once per finished task
        try:
            with evaluator_pool(cluster, evaluator_cls=self.evaluator_cls, model=config.model, windows=windows,
                                batch_size=config.search.batch_size, dtype=config.dtype,
                                permutation=self.rundir.read_permutation(),
                                kv_weight=config.search.kv_weight) as pool:
                self.replica_dtype, self.permutation = pool.dtype, pool.permutation
                if pool.permutation is not None:
                    self.rundir.write_permutation(pool.permutation)
                dispatcher = Dispatcher(pool.actors, timeout_s=cluster.eval_timeout_s,
                                        max_attempts=cluster.max_attempts, joiner=pool.joiner)
                self.scorer = Scorer(cache, dispatcher, arch, pool.model_fingerprint, fingerprints,
                                     progress=self.progress, batch_size=config.search.batch_size,
                                     window_shapes={name: w.shape for name, w in windows.items()})
                run = search_run(config, self.scorer, self.rundir)
                searcher = drive(run)
                heldout = run.heldout(searcher)
                extra = run.extras(searcher)
        finally:
            cache.compact()  # flushes, then merges this run's parts into one
        counters = self.scorer.counters
        counters.seconds = time.perf_counter() - t0
        result = CampaignResult(self.run_dir, searcher, heldout, counters, counters.seconds, extra)
        self.write_outputs(result, arch)
        return result

    def _export_dtype(self) -> str:
        """The dtype the search ran in, so the export is the model that was scored (its weights in
        that dtype); unknown (no pool): the checkpoint's own."""
        return self.config.dtype if self.config.dtype != "auto" else (self.replica_dtype or "auto")

    def write_outputs(self, result: CampaignResult, arch: Arch) -> None:
        """path.json, pruning_config.json, search.json (a whole-mask search), model/, the report."""
        from search_spaces.pruning_config import mask_to_pruning_config

        searcher = result.searcher
        path = {
            "dense_ppl": searcher.dense_ppl,
            "dense_params": dense_params(arch),
            "target_ratio": self.config.search.target_ratio,
            "steps": [s.to_dict() for s in searcher.path],
            "heldout": result.heldout,
            "evaluations": result.counters.to_dict(),
            "seconds": result.wall_seconds,
            "arch": dataclasses.asdict(arch),  # dense widths, for the report's mask picture
            "dtype": self._export_dtype(),  # what the search ran in: `rayprune export` rebuilds in it
            **result.extra.get("path", {}),  # method-specific figures (SPRINT: speedup, latency table)
        }
        self.rundir.write_path(path)
        self.rundir.write_json("pruning_config.json", mask_to_pruning_config(searcher.current, arch))
        if (summary := searcher.summary()) is not None:  # what a whole-mask search found (Optuna: every trial)
            self.rundir.write_json("search.json", summary)
        if not self.config.export:
            for problem in self.rundir.stale_artefacts(path):
                log.warning("export: false, and %s", problem)
        else:
            from actors.export import export_compact

            export_compact(self.config.model, searcher.current, self.run_dir / "model",
                           **{"dtype": path["dtype"], "permutation": self.permutation, **result.extra.get("export", {})})
            log.info("compact model written to %s", self.run_dir / "model")
        write_report(self.run_dir)
