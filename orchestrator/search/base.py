"""The searcher interface shared by every search method.

A searcher is a small state machine with two calls, in the shape of Ray Tune's ``Searcher``:
``suggest()`` returns the next batch of masks to score (or ``None`` when the search is over) and
``observe(scores)`` hands back the calibration perplexity of every mask of that batch. Searchers
never evaluate anything themselves, so they are deterministic given the scores: a campaign that is
rerun against a complete cache replays the same decisions without running a single forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

from search_spaces import Mask, rank_value

#: ``trial``: a whole mask proposed by a sampler (Optuna); its ``layer`` holds the trial number.
StepKind = Literal["attn", "mlp", "attn_width", "mlp_width", "trial"]


@dataclass(frozen=True)
class Proposal:
    """Masks to score. ``base`` is the model they branch from (a hint for prefix reuse).

    ``levels`` (window counts, empty: none) asks for scores built from cached segments of the
    calibration windows cut at those counts, and ``fidelity`` for the score on the first that many
    windows (None: all); see :meth:`~orchestrator.scorer.Scorer.score_upto`. ``window_set`` names
    the calibration set to score on (None: the run's ``calibration``; MultiPruner's width stages
    use ``calibration_width`` under its protocol)."""

    masks: tuple[Mask, ...]
    base: Mask | None = None
    label: str = ""
    fidelity: int | None = None
    levels: tuple[int, ...] = ()
    window_set: str | None = None


@dataclass(frozen=True)
class Step:
    """One decision on the removal path, with the state of the model right after it."""

    step: int
    kind: StepKind
    layer: int
    ppl: float
    ratio: float
    mask: Mask = field(compare=False)
    params: int = 0

    @property
    def width(self) -> int | None:
        """Width kept after a width step (MLP channels or head units); None for block removals."""
        if self.kind == "mlp_width":
            return dict(self.mask.mlp_width)[self.layer]
        if self.kind == "attn_width":
            return dict(self.mask.head_units)[self.layer]
        return None

    def to_dict(self) -> dict[str, Any]:
        out = {"step": self.step, "kind": self.kind, "layer": self.layer, "ppl": self.ppl, "ratio": self.ratio,
               "params": self.params, "mask": self.mask.to_dict()}
        if self.width is not None:
            out["width"] = self.width
        return out


class Searcher(ABC):
    """Contract: ``suggest`` and ``observe`` alternate; ``observe`` receives a score for every mask
    of the last proposal; after ``suggest`` returns ``None`` the search is finished and ``path``
    is final."""

    #: What answers a proposal: ``"perplexity"`` (calibration perplexity of every mask, through the
    #: cache and the pool) or ``"sprint_step"`` (a remote SPRINT step, :mod:`orchestrator.sprint_run`).
    scoring: ClassVar[str] = "perplexity"
    dense_ppl: float | None = None
    path: list[Step]

    @abstractmethod
    def suggest(self) -> Proposal | None: ...

    @abstractmethod
    def observe(self, scores: Mapping[Mask, float]) -> None: ...

    def references(self) -> dict[str, Mask]:
        """Masks to score on the held-out windows next to the final one (e.g. Optuna's greedy mask)."""
        return {}

    def summary(self) -> dict[str, Any] | None:
        """What a whole-mask search found, for ``search.json`` (None: nothing beyond the path)."""
        return None

    @property
    def current(self) -> Mask:
        return self.path[-1].mask if self.path else Mask()
