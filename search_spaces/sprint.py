"""SPRINT's pure arithmetic: comparison points, checkpoints, what to re-score, step requests.

Pure Python, shared by the searcher (``orchestrator.search.sprint``, which decides) and the actor
(``actors.sprint``, which computes). Terms:

- the *target* of candidate block ``s`` in the current model is the next remaining MLP block after
  it (the block right after it when none is left): its local sensitivity compares the stream after
  the target with ``s`` kept and with ``s`` skipped;
- *checkpoints* are the streams entering every ``every``-th layer (default ``L // 4``), cached by the
  actor per model state so that a step can start its walk at the last checkpoint before the change;
- a *state* is a mask plus the refitted ``down_proj`` weights of some MLP layers (by content hash);
- the *reference* of candidate ``s`` is the stream its removal is compared with (sensitivity) and,
  with the ``local`` refit target, what the refit aims at: with ``window`` (SPRINT's code) the stream
  after the target when every block from ``s`` to the target runs, those the mask already removed
  included (SPRINT runs the comparison window ``is_gt``, as unpruned); with ``current`` the current
  model's stream after the target;
- the *memory* (``remembered``): tuned scores of earlier steps whose window the removals since have
  not reached. SPRINT chooses among them and this step's tuned top-k, and refits only new candidates.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .latency import BlockCosts, rank_candidates
from .mask import Block, Mask

Tuned = tuple[tuple[int, str], ...]  # (MLP layer, sha256 of its refitted down_proj), sorted by layer


def target_block(mask: Mask, num_layers: int, index: int) -> int:
    """The block after which candidate ``index`` is compared: the next present MLP block after it;
    with no MLP left after it, the block right after it (the last block for the last one), as
    SPRINT's ``get_tuning_subid`` has it. Such a candidate has nothing to refit (``no-mlp``)."""
    for j in range(index + 1, 2 * num_layers):
        if j % 2 == 1 and not mask.removed(Block.from_index(j)):
            return j
    return min(index + 1, 2 * num_layers - 1)


def present_blocks(mask: Mask, num_layers: int) -> list[int]:
    return [i for i in range(2 * num_layers) if not mask.removed(Block.from_index(i))]


def checkpoint_blocks(num_layers: int, every: int | None = None) -> tuple[int, ...]:
    """Block indices whose entering stream is a checkpoint: layers 0, every, 2*every, ..."""
    every = every or max(1, num_layers // 4)
    if every < 1:
        raise ValueError(f"checkpoint interval {every} is not a positive number of layers; use e.g. {num_layers // 4}")
    return tuple(2 * layer for layer in range(0, num_layers, every))


def checkpoint_before(index: int, checkpoints: tuple[int, ...]) -> int:
    """The last checkpoint at or before block ``index`` (block 0 always is one)."""
    return max((c for c in checkpoints if c <= index), default=0)


def rescore_after(mask: Mask, num_layers: int, pruned: int) -> list[int]:
    """Candidates of ``mask`` (the model after removing block ``pruned``) whose sensitivity changed.

    A candidate ``s`` depends on the stream entering it and on blocks ``s..target(s)``. Removing
    ``pruned`` (and refitting the MLP after it) changes nothing before ``pruned``, so exactly the
    candidates whose window reaches ``pruned`` change: ``target(s) >= pruned`` before or after the
    removal (removing the last MLP moves the target of a candidate before it back to the block right
    after it). That is every block after ``pruned`` and the few just before it; all others keep
    their score (exact reuse).
    """
    before = restored(mask, [pruned])
    return [s for s in present_blocks(mask, num_layers)
            if max(target_block(mask, num_layers, s), target_block(before, num_layers, s)) >= pruned]


def window_removed(mask: Mask, num_layers: int, index: int) -> list[int]:
    """Blocks between candidate ``index`` and its target (the target included) that ``mask`` removed:
    those the ``window`` reference runs again."""
    return [j for j in range(index + 1, target_block(mask, num_layers, index) + 1)
            if mask.removed(Block.from_index(j))]


def restored(mask: Mask, blocks: list[int] | tuple[int, ...]) -> Mask:
    """``mask`` with ``blocks`` present again (at full width): the model a ``window`` reference runs."""
    attn = {Block.from_index(j).layer for j in blocks if j % 2 == 0}
    mlp = {Block.from_index(j).layer for j in blocks if j % 2 == 1}
    return Mask(mask.attn_removed - attn, mask.mlp_removed - mlp, mask.head_units, mask.mlp_width)


def tuned_items(tuned: Mapping[int, str] | Tuned, mask: Mask) -> Tuned:
    """Canonical tuned weights: sorted, only for MLP layers that ``mask`` keeps."""
    items = tuned.items() if isinstance(tuned, Mapping) else tuned
    return tuple(sorted((int(l), str(h)) for l, h in items if int(l) not in mask.mlp_removed))


def tuned_fingerprint(tuned: Tuned) -> str:
    """Suffix for a model fingerprint: '' without refitted weights, else '+tuned:<sha256>'."""
    if not tuned:
        return ""
    return "+tuned:" + hashlib.sha256(json.dumps([list(t) for t in tuned]).encode()).hexdigest()


def state_key(mask: Mask, tuned: Tuned) -> str:
    """Content key of a model state (mask + refitted weights), for the actor's checkpoint memo."""
    return hashlib.sha256((mask.to_json() + tuned_fingerprint(tuned_items(tuned, mask))).encode()).hexdigest()


def tensor_key(shape: tuple[int, ...], dtype: str, data: bytes) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: the content hash of refitted weights."""
    digest = hashlib.sha256(json.dumps([dtype, list(shape)]).encode())
    digest.update(data)
    return digest.hexdigest()


def refit_targets(mask: Mask, num_layers: int, top: list[int] | tuple[int, ...]) -> dict[int, int]:
    """``{candidate: target MLP block}`` for the candidates of ``top`` whose removal is followed by a
    refit: those with a present MLP block after them (a candidate that is itself the last MLP, or with
    none left after it, has nothing to refit: status ``no-mlp``)."""
    out = {}
    for s in top:
        t = target_block(mask, num_layers, s)
        if t % 2 == 1 and t != s and not mask.removed(Block.from_index(t)):
            out[s] = t
    return out


def refit_candidates(request: StepRequest, top: list[int]) -> list[int]:
    """The candidates of ``top`` this step tunes: those without a remembered tuned score."""
    remembered = dict(request.remembered)
    return [s for s in top if s not in remembered]


def tuned_records(request: StepRequest, num_layers: int, top: list[int], ranked: Mapping[int, float],
                  fits: Mapping[int, Mapping[str, Any]], rescored: Mapping[int, float]) -> list[dict[str, Any]]:
    """The step's ``tuned`` records: every candidate of the choice, ``top`` first (in order), then the
    remembered ones outside it (by block). Each has its target, ``untuned`` sensitivity, ``status`` and
    tuned ``sensitivity``:

    - remembered (``request.remembered``): status ``remembered``, the score of the step that tuned it;
    - with a refit (:func:`refit_targets`): the refit's ``status``/``before``/``after`` (``fits``) and
      the sensitivity with the refitted weights (``rescored``) when it is ``ok``, else the untuned one;
    - without an MLP after it (``no-mlp``): ``inf`` (SPRINT), or the untuned one (``no_mlp_score``).
    """
    mask, remembered = request.mask, dict(request.remembered)
    records = []
    for s in [*top, *sorted(set(remembered) - set(top))]:
        t = target_block(mask, num_layers, s)
        if s in remembered:
            records.append({"block": s, "target": t, "sensitivity": remembered[s], "untuned": ranked[s],
                            "status": "remembered", "before": None, "after": None})
            continue
        fit = fits.get(s, {})
        status = fit.get("status", "no-mlp")
        if status == "ok":
            value = rescored[s]
        elif status == "no-mlp" and request.no_mlp_score == "inf":
            value = math.inf
        else:
            value = ranked[s]
        records.append({"block": s, "target": t, "sensitivity": value, "untuned": ranked[s], "status": status,
                        "before": fit.get("before"), "after": fit.get("after")})
    return records


def best_tuned(tuned: list[dict[str, Any]], costs: BlockCosts) -> dict[str, Any]:
    """The record of ``tuned`` (:func:`tuned_records`) with the lowest importance: the step's choice."""
    from .latency import best_candidate

    best = best_candidate({t["block"]: t["sensitivity"] for t in tuned}, costs)
    return next(t for t in tuned if t["block"] == best)


def remember(tuned: list[dict[str, Any]], chosen: int) -> tuple[tuple[int, float], ...]:
    """The memory after removing ``chosen``: the tuned scores of ``tuned`` (a step's records) that had a
    refit (remembered ones included; not ``no-mlp``) whose window ends before ``chosen`` (SPRINT drops
    those whose tuned MLP is at or after the pruned block: their streams or weights change)."""
    return tuple(sorted((int(t["block"]), float(t["sensitivity"])) for t in tuned
                        if t["status"] != "no-mlp" and t["block"] != chosen and t["target"] < chosen))


def top_candidates(sensitivity: Mapping[int, float], costs: BlockCosts, k: int) -> list[int]:
    """The ``k`` candidates to tune: lowest importance (sensitivity / latency saved) first."""
    return rank_candidates(sensitivity, costs)[:k]


#: Choices of a step's arithmetic (the first of each is SPRINT's code, the default).
METRICS = ("l1", "l2")  # sum over sequences of |o - c| / |o|: L1 norms (SPRINT's l2_sentence), or L2
REFERENCES = ("window", "current")  # see the module docstring
REFIT_TARGETS = ("local", "dense")  # the refit reproduces the reference stream, or the dense model's
NO_MLP_SCORES = ("inf", "untuned")  # tuned score of a candidate with no MLP after it


@dataclass(frozen=True)
class StepRequest:
    """Everything one SPRINT step needs from an actor; the actor keeps nothing of it.

    The actor scores ``candidates`` (local sensitivity), ranks them together with ``known`` (scores
    reused from earlier steps), refits the MLP after each of the ``top_k`` best that has no
    ``remembered`` tuned score, re-scores them, and returns the best among those and the remembered
    ones, with its refitted weights (a remembered winner's refit is computed again: the same sums,
    since nothing in its window changed). ``parent``/``unchanged_before`` are hints for the actor's
    checkpoint memo (blocks before ``unchanged_before`` run identically in the parent state); results
    never depend on them. ``top_k = 0`` and no candidates: only the summed NLL of the state on
    ``window_set``. ``tuned`` names every refitted ``down_proj`` of the model, those of MLPs removed
    since included (a ``window`` reference runs them again, with the weights SPRINT left in them).
    """

    window_set: str
    mask: Mask
    tuned: Tuned = ()
    candidates: tuple[int, ...] = ()
    known: tuple[tuple[int, float], ...] = ()
    costs: BlockCosts = field(default_factory=lambda: BlockCosts(0.0, 1.0, 1.0))
    top_k: int = 5
    ridge: float = 0.0
    checkpoint_every: int | None = None
    parent: str | None = None
    unchanged_before: int = 0
    metric: str = "l1"
    reference: str = "window"
    refit_target: str = "local"
    no_mlp_score: str = "inf"
    remembered: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name, options in (("metric", METRICS), ("reference", REFERENCES), ("refit_target", REFIT_TARGETS),
                              ("no_mlp_score", NO_MLP_SCORES)):
            if getattr(self, name) not in options:
                raise ValueError(f"SPRINT step {name} {getattr(self, name)!r} is not one of {', '.join(options)}; "
                                 f"use {options[0]} (SPRINT's code)")

    def to_dict(self) -> dict[str, Any]:
        return {"window_set": self.window_set, "mask": self.mask.to_dict(), "tuned": [list(t) for t in self.tuned],
                "candidates": list(self.candidates), "known": [list(k) for k in self.known],
                "costs": {"fixed": self.costs.fixed, "attn": self.costs.attn, "mlp": self.costs.mlp},
                "top_k": self.top_k, "ridge": self.ridge, "checkpoint_every": self.checkpoint_every,
                "parent": self.parent, "unchanged_before": self.unchanged_before, "metric": self.metric,
                "reference": self.reference, "refit_target": self.refit_target, "no_mlp_score": self.no_mlp_score,
                "remembered": [list(r) for r in self.remembered]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRequest:
        c = data["costs"]
        return cls(data["window_set"], Mask.from_dict(data["mask"]), tuple((int(l), str(h)) for l, h in data["tuned"]),
                   tuple(int(i) for i in data["candidates"]), tuple((int(i), float(s)) for i, s in data["known"]),
                   BlockCosts(float(c["fixed"]), float(c["attn"]), float(c["mlp"])), int(data["top_k"]),
                   float(data["ridge"]), data.get("checkpoint_every"), data.get("parent"),
                   int(data.get("unchanged_before", 0)), str(data.get("metric", "l1")),
                   str(data.get("reference", "window")), str(data.get("refit_target", "local")),
                   str(data.get("no_mlp_score", "inf")),
                   tuple((int(i), float(v)) for i, v in data.get("remembered", ())))

    def key(self, model_fingerprint: str, windows_fingerprint: str) -> str:
        """Content key of the step's result: the request without the memo hints, on this model and data."""
        body = {k: v for k, v in self.to_dict().items() if k not in ("parent", "unchanged_before")}
        payload = json.dumps({"request": body, "model": model_fingerprint, "windows": windows_fingerprint},
                             sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()
