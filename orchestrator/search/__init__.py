"""Search methods: each a ``Searcher`` with ``suggest`` and ``observe``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .base import Proposal, Searcher, Step
from .blockpruner import BlockPrunerSearcher
from .greedy import GreedySearcher
from .multipruner import MultiPrunerSearcher

if TYPE_CHECKING:
    from search_spaces import Arch, Mask
    from search_spaces.latency import BlockCosts

    from ..config import SearchConfig


def searcher_class(method: str) -> type[Searcher]:
    """The searcher class of a method (its ``scoring`` says what answers its proposals)."""
    if method == "optuna":
        from .optuna_search import OptunaSearcher

        return OptunaSearcher
    if method == "sprint":
        from .sprint import SprintSearcher

        return SprintSearcher
    if method == "evolution":
        from .evolution import EvolutionSearcher

        return EvolutionSearcher
    classes: dict[str, type[Searcher]] = {"blockpruner": BlockPrunerSearcher, "multipruner": MultiPrunerSearcher}
    if method not in classes:
        raise ValueError(f"search.method {method!r} has no searcher")
    return classes[method]


def make_searcher(search: SearchConfig, arch: Arch, *, run_dir: Path | None = None, pool_size: int = 1,
                  known: Mapping[Mask, float] | None = None, costs: BlockCosts | None = None,
                  hf_config: Mapping[str, Any] | None = None, width_windows: str | None = None,
                  calibration: tuple[int, int] | None = None) -> Searcher:
    """The searcher a config asks for, wrapped in racing (``search.racing.windows``) for the greedy methods."""
    searcher = _make_searcher(search, arch, run_dir=run_dir, pool_size=pool_size, known=known, costs=costs,
                              hf_config=hf_config, width_windows=width_windows,
                              calibration=calibration)
    racing = search.racing
    if racing.windows is None:
        return searcher
    if search.method not in ("blockpruner", "multipruner"):
        raise ValueError(f"search.racing applies to blockpruner and multipruner, not {search.method}; remove "
                         f"search.racing.windows")
    from .racing import RacingSearcher

    return RacingSearcher(searcher, windows=racing.windows, keep=racing.keep, min_margin=racing.min_margin,
                          probes=racing.probes, audit=racing.audit)


def _make_searcher(search: SearchConfig, arch: Arch, *, run_dir: Path | None = None, pool_size: int = 1,
                   known: Mapping[Mask, float] | None = None, costs: BlockCosts | None = None,
                   hf_config: Mapping[str, Any] | None = None, width_windows: str | None = None,
                   calibration: tuple[int, int] | None = None) -> Searcher:
    """The searcher a config asks for (the config has already checked the method name).

    ``run_dir`` holds a searcher's own state (Optuna's study journal; None: in memory),
    ``pool_size`` is the number of evaluators a batch should fill, ``known`` the calibration
    perplexities already in the cache (a study is warm-started from them), ``costs`` the per-block
    latency that an evaluator measured (SPRINT ranks by it; the other methods ignore it),
    ``hf_config`` the model's ``config.json`` (it tells MultiPruner's Llama-3.1 recipe from Llama-3's),
    ``width_windows`` the calibration set of MultiPruner's width stages (None: the run's calibration),
    ``calibration`` the calibration set's (windows, tokens predicted per window): evolution's
    ``first_windows: auto`` scales to it and ``max_tokens`` counts in it (None: unknown; one
    selection step on every window, and no token budget).
    """
    if search.method == "blockpruner":
        return BlockPrunerSearcher(arch, search.target_ratio, search.max_steps)
    if search.method == "multipruner":
        from search_spaces.budget import family_defaults

        defaults = family_defaults(arch, hf_config=hf_config)
        return MultiPrunerSearcher(arch, search.target_ratio, search.split or defaults.split,
                                   search.mlp_group or defaults.mlp_group, search.head_group or defaults.head_group,
                                   search.max_steps, order=search.order, stage_stop=search.stage_stop,
                                   width_windows=width_windows)
    if search.method == "optuna":
        from search_spaces.budget import grid_group

        from .optuna_search import OptunaSearcher

        return OptunaSearcher(arch, search.target_ratio, trials=search.trials, batch=search.batch or 2 * pool_size,
                              sampler=search.sampler, seed=search.seed, ratio_tolerance=search.ratio_tolerance,
                              widths=search.widths, mlp_group=search.mlp_group or grid_group(arch),
                              head_group=search.head_group or 1, warm_start=search.warm_start,
                              storage=None if run_dir is None else Path(run_dir) / "optuna.journal", known=known)
    if search.method == "sprint":
        from .sprint import SprintSearcher

        if costs is None:
            raise ValueError("SPRINT ranks blocks by the latency they save: pass costs=LatencyTable.scenario_costs(...) "
                             "measured by an evaluator (Evaluator.latency_table)")
        return SprintSearcher.from_search(search, arch, costs)
    if search.method == "evolution":
        from search_spaces.budget import grid_group

        from .evolution import EvolutionSearcher

        e = search.evolution
        return EvolutionSearcher(arch, search.target_ratio, offspring=e.offspring, generations=e.generations,
                                 max_swaps=e.max_swaps, seed=search.seed, max_evaluations=e.max_evaluations,
                                 first_windows=first_windows(e.first_windows, calibration, search.batch_size),
                                 survivors=e.survivors, widths=search.widths, max_tokens=e.max_tokens,
                                 calibration=calibration,
                                 mlp_group=search.mlp_group or grid_group(arch),
                                 head_group=search.head_group or 1, known=known)
    raise ValueError(f"search.method {search.method!r} has no searcher")


def first_windows(setting: int | str | None, calibration: tuple[int, int] | None, batch_size: int) -> int | None:
    """Evolution's first selection step in windows, as the scorer cuts it (whole batches; None: one
    step on every window). ``auto`` is EvoPress's share of the calibration windows."""
    if setting is None or calibration is None:
        return None if setting in (None, "auto") else setting  # type: ignore[return-value]
    from search_spaces.evolution import default_first_windows, first_step_windows

    windows = calibration[0]
    if setting == "auto":
        return default_first_windows(windows, batch_size)
    return first_step_windows(int(setting), windows, batch_size)


__all__ = ["BlockPrunerSearcher", "GreedySearcher", "MultiPrunerSearcher", "Proposal", "Searcher", "Step",
           "make_searcher", "searcher_class"]
