"""How a campaign answers its searcher: one runner per kind of scoring a searcher declares.

A searcher only proposes and decides (:mod:`orchestrator.search`). Its class attribute ``scoring``
says what answers a proposal, and :func:`search_run` picks the runner that does it:

- ``"perplexity"`` (BlockPruner, MultiPruner, Optuna): :class:`PerplexityRun` scores every mask
  of a proposal on the calibration windows through the :class:`~orchestrator.scorer.Scorer`;
- ``"sprint_step"`` (SPRINT): :class:`~orchestrator.sprint_run.SprintRun` runs one remote step.

Every runner builds its searcher, answers proposals, scores the held-out windows and names the
method-specific figures for ``path.json`` and the export (``extras``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from search_spaces import Mask

from .search import Proposal, Searcher, make_searcher, searcher_class

if TYPE_CHECKING:
    from .config import Config
    from .rundir import RunDir
    from .scorer import Scorer

log = logging.getLogger("rayprune")


class SearchRun(Protocol):
    def searcher(self) -> Searcher: ...

    def answer(self, searcher: Searcher, proposal: Proposal) -> None: ...

    def heldout(self, searcher: Searcher) -> dict[str, float]: ...

    def extras(self, searcher: Searcher) -> dict[str, Any]: ...


class PerplexityRun:
    """Proposals answered with the calibration perplexity of every mask."""

    def __init__(self, config: Config, scorer: Scorer, rundir: RunDir, *, window_set: str = "calibration") -> None:
        from search_spaces.scores import fitness_tag

        self.config, self.scorer, self.rundir, self.window_set = config, scorer, rundir, window_set
        self.fitness = fitness_tag(config.search.fitness, config.search.kl_top_k)  # calibration scores only
        self._logged = 0

    def searcher(self) -> Searcher:
        from actors.models import read_model_config

        from .data.protocols import WIDTH_WINDOWS

        return make_searcher(self.config.search, self.scorer.arch, run_dir=self.rundir.path,
                             pool_size=len(self.scorer.dispatcher.actors),
                             known=self.scorer.known(self.window_set, self.fitness),
                             hf_config=read_model_config(self.config.model),
                             width_windows=WIDTH_WINDOWS if WIDTH_WINDOWS in self.scorer.fingerprints else None,
                             calibration=self._calibration())

    def _calibration(self) -> tuple[int, int] | None:
        """The calibration set's (windows, tokens predicted per window), as the scorer counts them."""
        shape = self.scorer.window_shapes.get(self.window_set)
        return (shape[0], shape[1] - 1) if shape else None

    def answer(self, searcher: Searcher, proposal: Proposal) -> None:
        window_set = proposal.window_set or self.window_set  # MultiPruner's width stages: their own rows
        if proposal.levels:  # fidelity levels: scores from cached segments of the windows
            scores = self.scorer.score_upto(proposal.masks, proposal.base, window_set, proposal.fidelity,
                                            proposal.levels, proposal.label, self.fitness)
        else:
            scores = self.scorer.score(proposal.masks, proposal.base, window_set, proposal.label, self.fitness)
        searcher.observe(scores)
        for s in searcher.path[self._logged:]:  # steps new since the last batch
            what = f"Optuna trial {s.layer}" if s.kind == "trial" else f"remove {s.kind} {s.layer}"
            log.info("step %d: %s -> ppl %.3f, ratio %.4f", s.step, what, s.ppl, s.ratio)
        self._logged = len(searcher.path)

    def heldout(self, searcher: Searcher) -> dict[str, float]:
        final, references = searcher.current, searcher.references()
        held = self.scorer.score([Mask(), final, *references.values()], Mask(), "evaluation", "held-out")
        return {"dense_ppl": held[Mask()], "pruned_ppl": held[final],
                **{f"{name}_ppl": held[mask] for name, mask in references.items()}}

    def extras(self, searcher: Searcher) -> dict[str, Any]:
        return {"path": {"fitness": self.fitness}} if self.fitness != "ppl" else {}


def search_run(config: Config, scorer: Scorer, rundir: RunDir) -> SearchRun:
    """The runner for ``config.search.method``, chosen by what its searcher declares it needs."""
    if searcher_class(config.search.method).scoring == "sprint_step":
        from .sprint_run import SprintRun

        return SprintRun(config, scorer, rundir)
    return PerplexityRun(config, scorer, rundir)


def drive(run: SearchRun) -> Searcher:
    """Build the searcher and answer its proposals until it is done; returns it, finished."""
    searcher = run.searcher()
    while (proposal := searcher.suggest()) is not None:
        run.answer(searcher, proposal)
    return searcher
