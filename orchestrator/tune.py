"""``rayprune tune``: Ray Tune with OptunaSearch over the hyperparameters of a greedy campaign.

Each Tune trial is a staged greedy (MultiPruner-style) campaign to the config's target ratio with
its own stage order, budget split ``a:b:c``, MLP group size and number of calibration sequences
(BlockPruner is the corner ``1:0:0``). Design, so that no trial reloads the model:

- The driver starts ONE pool of evaluator actors for the whole run. Each replica loads the model
  once and holds every window set a trial may ask for: one calibration set per size in the space
  (``calibration@<n>``), ``validation`` and ``evaluation``.
- Tune runs the trials one at a time through its function API (``max_concurrent_trials=1``). A
  trial receives the pool's handles (``tune.with_parameters``), drives its searcher with its own
  :class:`~orchestrator.dispatch.Dispatcher` and scores through the run directory's one cache
  (``evals/``), so trials share every evaluation they have in common (the first block removals,
  usually). A trial asks Tune for no CPU (it only waits on the pool; Tune needs a non-empty
  request, so it asks for 1 MiB of memory). Running trials one at a time loses nothing: each
  one keeps every evaluator busy.
- Trials are ranked by perplexity on ``validation`` windows, drawn from the TRAIN split with a
  seed of their own (calibration seed + 7919), never on the held-out test windows; held-out
  perplexity is listed for information. (Validation and calibration windows are drawn
  independently, so they may overlap in a small corpus.)

Outputs in the run directory: ``tune_results.csv`` (one row per trial), ``tune_report.md`` (the
table, best first) and ``best.yaml``, a complete campaign config with the best hyperparameters
whose output is this run directory: ``rayprune run <run_dir>/best.yaml`` replays the best trial
from the shared cache and writes its path, report and model. Tune's own files go to ``tune/``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from search_spaces import Arch, Mask

from .rundir import RunDir

if TYPE_CHECKING:
    from .config import Config
    from .scorer import Scorer

log = logging.getLogger("rayprune")

STAGES = ("blocks", "mlp", "heads")
ORDERS = tuple(",".join(p) for p in itertools.permutations(STAGES))
METRIC = "val_ppl"
COLUMNS = ("trial", "order", "split", "mlp_group", "calibration_sequences", "val_ppl", "heldout_ppl", "calib_ppl",
           "ratio", "steps", "evaluated", "cached", "failed", "seconds")


@dataclasses.dataclass(frozen=True)
class TuneSpace:
    """What the trials may choose. Shares step by 0.1; heads get at most ``max_heads_share`` of the rest."""

    calibration_sequences: tuple[int, ...]
    mlp_groups: tuple[int, ...]
    orders: tuple[str, ...] = ORDERS
    max_heads_share: float = 0.3

    def define(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run space; returns the split it implies (a constant for Tune's config)."""
        trial.suggest_categorical("order", list(self.orders))
        blocks = trial.suggest_float("blocks_share", 0.0, 1.0, step=0.1)
        heads = trial.suggest_float("heads_of_rest", 0.0, self.max_heads_share, step=0.1)
        trial.suggest_categorical("mlp_group", list(self.mlp_groups))
        trial.suggest_categorical("calibration_sequences", list(self.calibration_sequences))
        return {"split": split_of(blocks, heads)}


def split_of(blocks_share: float, heads_of_rest: float) -> tuple[float, float, float]:
    """``a:b:c`` from the blocks' share and the heads' share of what blocks leave (sums to 1)."""
    a = round(blocks_share, 4)
    c = round((1 - a) * heads_of_rest, 4)
    return (a, round(1 - a - c, 4), c)


def default_space(config: Config, arch: Arch) -> TuneSpace:
    """Calibration sizes n/2 and n of the config; MLP groups near a twelfth, sixth and quarter of the width."""
    from search_spaces.budget import _group

    if config.data.protocol != "rayprune" or config.data.calibration.sequences is None:
        raise ValueError(f"rayprune tune draws calibration sets of several sizes, which the {config.data.protocol} "
                         "protocol does not define; run it with data.protocol=rayprune")
    n = config.data.calibration.sequences
    groups = sorted({_group(arch, arch.intermediate_size // k) for k in (12, 6, 4)})
    return TuneSpace(tuple(sorted({max(1, n // 2), n})), tuple(groups))


def trial_config(base: Config, hp: dict[str, Any]) -> Config:
    """The campaign config of one trial: MultiPruner with the trial's order, split, group and calibration."""
    search = dataclasses.replace(base.search, method="multipruner", split=tuple(hp["split"]),
                                 mlp_group=int(hp["mlp_group"]), order=tuple(hp["order"].split(",")))
    calibration = dataclasses.replace(base.data.calibration, sequences=int(hp["calibration_sequences"]))
    return dataclasses.replace(base, search=search, data=dataclasses.replace(base.data, calibration=calibration))


def trial_scorer(config: Config, arch: Arch, actors: Sequence[Any], fingerprints: dict[str, str],
                 model_fp: str, window_shapes: dict[str, tuple[int, ...]] | None = None) -> Scorer:
    """A :class:`~orchestrator.scorer.Scorer` on the shared pool and the run directory's one cache;
    with ``window_shapes`` (window set -> shape), a step with few masks is cut into window shards.

    Window sets are named as the actors hold them (``calibration@<n>``, ``validation``, ...).
    """
    from .cache import EvalCache
    from .dispatch import Dispatcher
    from .scorer import Scorer

    dispatcher = Dispatcher(actors, timeout_s=config.cluster.eval_timeout_s, max_attempts=config.cluster.max_attempts)
    return Scorer(EvalCache(RunDir(config.output).evals, flush_every=None), dispatcher, arch, model_fp, fingerprints,
                  batch_size=config.search.batch_size, window_shapes=window_shapes)


def run_trial(hp: dict[str, Any], *, base: Config, arch: Arch, actors: Sequence[Any], fingerprints: dict[str, str],
              model_fp: str, window_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """One greedy campaign against the shared pool; returns (and reports to Tune) its figures."""
    from .search_run import PerplexityRun, drive

    t0 = time.perf_counter()
    config = trial_config(base, hp)
    scorer = trial_scorer(config, arch, actors, fingerprints, model_fp, window_shapes)
    window = f"calibration@{config.data.calibration.sequences}"
    try:
        searcher = drive(PerplexityRun(config, scorer, RunDir(config.output), window_set=window))
        final = searcher.current
        val = scorer.score([final], Mask(), "validation", "validation")[final]
        held = scorer.score([final], Mask(), "evaluation", "held-out")[final]
    finally:
        scorer.cache.flush()
    last = searcher.path[-1] if searcher.path else None
    counters = scorer.counters
    return {METRIC: val, "heldout_ppl": held, "calib_ppl": last.ppl if last else searcher.dense_ppl,
            "ratio": last.ratio if last else 0.0, "steps": len(searcher.path), "evaluated": counters.evaluated,
            "cached": counters.cached, "failed": counters.failed, "seconds": time.perf_counter() - t0,
            "mask": final.to_json()}


def _trainable(hp: dict[str, Any], **context: Any) -> None:
    from ray import tune

    if not log.handlers and not logging.getLogger().handlers:  # a Tune worker: its log goes to the driver
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    tune.report(run_trial(hp, **context))


def run_tune(config: Config, *, trials: int, seed: int = 0, space: TuneSpace | None = None,
             evaluator_cls: type | None = None) -> list[dict[str, Any]]:
    """Tune ``trials`` greedy campaigns; write the results table, report and best.yaml; return the rows
    (best first). Raises RunDirectoryBusy if another driver holds the run directory."""
    from .storage import redact_uri, uri_scheme

    if uri_scheme(config.output) is not None:
        raise ValueError(f"rayprune tune writes its run directory to a path, not {redact_uri(config.output)!r}; set "
                         f"output to a path (a shared mount works) and copy the results to the storage afterwards")
    run_dir = Path(config.output).absolute()
    config = dataclasses.replace(config, output=str(run_dir))
    with RunDir(run_dir):  # one driver per run directory, as for `rayprune run`
        return _tune(config, run_dir, trials, seed, space, evaluator_cls)


def _tune(config: Config, run_dir: Path, trials: int, seed: int, space: TuneSpace | None,
          evaluator_cls: type | None) -> list[dict[str, Any]]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    from actors.models import read_model_config
    from cluster.session import evaluator_pool

    from .data.campaign_windows import campaign_windows
    from .data.windows import windows_fingerprint

    arch = Arch.from_hf_config(read_model_config(config.model))
    space = space or default_space(config, arch)
    if config.data.calibration.windows:
        raise ValueError("rayprune tune draws calibration windows of several sizes; remove "
                         "data.calibration.windows from the config (or set it to null)")
    windows = campaign_windows(config, space.calibration_sequences)
    fingerprints = {name: windows_fingerprint(w) for name, w in windows.items()}
    from cluster.replica_size import resolve_gpus_per_actor

    cluster = dataclasses.replace(config.cluster, gpus_per_actor=resolve_gpus_per_actor(config))
    if not isinstance(cluster.actors, int):
        raise ValueError("rayprune tune needs a fixed pool: set cluster.actors to a number, e.g. cluster.actors=2")
    rundir = RunDir(run_dir)
    with evaluator_pool(cluster, evaluator_cls=evaluator_cls, model=config.model, windows=windows,
                        batch_size=config.search.batch_size, dtype=config.dtype,
                        permutation=rundir.read_permutation(), kv_weight=config.search.kv_weight) as pool:
        if pool.permutation is not None:  # the one order of every trial, and of `run best.yaml` here
            rundir.write_permutation(pool.permutation)
        if pool.joiner is not None:  # trials share one pool: wait until every replica has come
            pool = dataclasses.replace(pool, actors=pool.actors + pool.joiner.wait_all())
        log.info("tune: %d evaluator(s), %d trials, one at a time", len(pool.actors), trials)
        shapes = {name: tuple(w.shape) for name, w in windows.items()}
        dense = trial_scorer(config, arch, pool.actors, fingerprints, pool.model_fingerprint, shapes)
        dense_figures = {name: dense.score([Mask()], None, name, name)[Mask()] for name in ("validation", "evaluation")}
        dense.cache.flush()
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # JSON and CSV below; no TensorBoard
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, base=config, arch=arch, actors=pool.actors, fingerprints=fingerprints,
                                 model_fp=pool.model_fingerprint, window_shapes=shapes),
            {"cpu": 0, "memory": 2**20})
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, min(10, trials // 2)))
        search = OptunaSearch(space=space.define, metric=METRIC, mode="min", sampler=sampler)
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(search_alg=search, num_samples=trials,
                                                                  max_concurrent_trials=1),
                           run_config=tune.RunConfig(name="tune", storage_path=str(run_dir), verbose=0,
                                                     callbacks=[JsonLoggerCallback(), CSVLoggerCallback()]))
        results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} tune trial(s) failed; the first: {results.errors[0]!r}")
    rows = [_row(i, r.config, r.metrics) for i, r in enumerate(results)]
    rows.sort(key=lambda r: (r[METRIC] if math.isfinite(r[METRIC]) else math.inf, r["trial"]))
    write_outputs(run_dir, config, rows, dense_figures)
    return rows


def _row(index: int, hp: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {"trial": index, "order": hp["order"], "split": ":".join(f"{x:g}" for x in hp["split"]),
            "mlp_group": hp["mlp_group"], "calibration_sequences": hp["calibration_sequences"],
            **{k: metrics[k] for k in COLUMNS[5:]}, "mask": metrics["mask"], "hp": hp}


def write_outputs(run_dir: Path, base: Config, rows: list[dict[str, Any]], dense: dict[str, float]) -> None:
    """``tune_results.csv``, ``tune_report.md`` and ``best.yaml`` (rows best first)."""
    from .config_load import to_yaml

    rundir = RunDir(run_dir)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    rundir.write_text("tune_results.csv", table.getvalue())
    rundir.write_text("best.yaml", to_yaml(trial_config(base, rows[0]["hp"])))
    rundir.write_json("tune_best.json", {k: v for k, v in rows[0].items() if k != "hp"})
    head = ["| trial | order | split | MLP group | cal. seq | ppl (validation) | ppl (held-out) | ppl (calibration) "
            "| ratio | evaluations run | from cache | seconds |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    body = [f"| {r['trial']} | {r['order']} | {r['split']} | {r['mlp_group']} | {r['calibration_sequences']} | "
            f"{r[METRIC]:.3f} | {r['heldout_ppl']:.3f} | {r['calib_ppl']:.3f} | {r['ratio']:.4f} | {r['evaluated']:,} | "
            f"{r['cached']:,} | {r['seconds']:.0f} |" for r in rows]
    b = rows[0]
    text = [f"# rayprune tune: {run_dir.name}", "",
            f"{len(rows)} greedy campaigns to ratio {base.search.target_ratio:g} on `{base.model}`, ranked by "
            f"perplexity on validation windows (train split); dense: validation {dense['validation']:.3f}, held-out "
            f"{dense['evaluation']:.3f}.", "",
            f"Best: order {b['order']}, split {b['split']}, MLP group {b['mlp_group']}, {b['calibration_sequences']} "
            f"calibration sequences: validation {b[METRIC]:.3f}, held-out {b['heldout_ppl']:.3f} at ratio "
            f"{b['ratio']:.4f}. Replay it from the shared cache: `rayprune run {run_dir / 'best.yaml'}`.", "",
            *head, *body, ""]
    rundir.write_text("tune_report.md", "\n".join(text))
