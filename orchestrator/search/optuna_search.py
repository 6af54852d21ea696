"""Optuna-guided mask search (SPEC §2): a study proposes whole masks in batches; scores are told back.

The search runs in two phases inside one campaign:

1. Warm start (``warm_start="blockpruner"``): a BlockPruner search to the target, proposed and
   observed like any greedy campaign (its evaluations land in the same cache). Its final mask is
   enqueued as the study's first trial, so the best trial is never worse than greedy, and the band
   then starts at its ratio (same width): no trial removes less than greedy did, so a better trial
   is never better just for removing less. Its first step scored every single removal: that is the
   prior by which proposals are repaired into the band (``BandSampler``).
2. The study: each ``suggest()`` asks up to ``batch`` trials (define-by-run: one integer per
   block, see :mod:`search_spaces.mask_space`), each repaired into the ratio band by
   :class:`~.band_sampler.BandSampler`; ``observe()`` tells them (NaN/inf: a failed trial, with a
   :class:`FailedTrialWarning`). A trial whose mask was already scored (earlier trials, the warm
   start, the cache) is told from memory at once and is not proposed again, nor counted in ``trials``.

A new study is seeded with every scored mask that lies in the band (``add_trial``, origin
``cache``): the cache rows the campaign passed in and the masks of the warm start. The study lives
in a journal file (``optuna.journal`` in the run directory), so a stopped campaign resumes it: the
trials left running are proposed first (the campaign serves from the cache what was evaluated),
and ``optuna-dashboard optuna.journal`` shows it. Its name encodes the space and sampler, so a
changed target starts a new study in the same journal, warm-started from the cache.

The path is BlockPruner's, followed by one step of kind ``trial`` (``layer`` = trial number) when a
trial beat the greedy mask; the final mask is the trial with the lowest calibration perplexity
(NSGA-II too: all trials are in the band; its front shows what more removal costs within it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from search_spaces import Arch, Mask, param_count, ratio
from search_spaces.mask_space import MaskSpace

from .base import Proposal, Searcher, Step
from .blockpruner import BlockPrunerSearcher

log = logging.getLogger("rayprune")

SAMPLERS = ("tpe", "nsga2")
WARM_STARTS = ("blockpruner", "none")


class FailedTrialWarning(RuntimeWarning):
    """A trial's mask scored NaN or inf; it was told to Optuna as a failed trial."""


class OptunaSearcher(Searcher):
    """Contract of :class:`~.base.Searcher`, plus: every proposed trial mask lies in ``space.band``,
    no mask is proposed twice, and at most ``trials`` masks are proposed by the sampler."""

    def __init__(self, arch: Arch, target_ratio: float, *, trials: int = 100, batch: int = 4, sampler: str = "tpe",
                 seed: int = 0, ratio_tolerance: float | None = None, widths: bool = False,
                 mlp_group: int | None = None, head_group: int = 1, warm_start: str = "blockpruner",
                 storage: str | Path | None = None, known: Mapping[Mask, float] | None = None) -> None:
        if sampler not in SAMPLERS or warm_start not in WARM_STARTS or trials < 1 or batch < 1:
            raise ValueError(f"sampler must be one of {SAMPLERS}, warm_start one of {WARM_STARTS}, trials and batch "
                             f">= 1; got {sampler!r}, {warm_start!r}, {trials}, {batch}")
        self.arch, self.target_ratio = arch, target_ratio
        self._space_options = dict(widths=widths, mlp_group=mlp_group, head_group=head_group)
        self.space = MaskSpace(arch, target_ratio, ratio_tolerance, **self._space_options)
        if problems := self.space.problems():
            raise ValueError("; ".join(problems))
        self.trials, self.batch, self.sampler_name, self.seed = trials, batch, sampler, seed
        self.storage_path = None if storage is None else Path(storage)
        self.path: list[Step] = []
        self._known: dict[Mask, float] = dict(known or {})  # every score seen: cache rows, then observations
        self._greedy = BlockPrunerSearcher(arch, target_ratio) if warm_start == "blockpruner" else None
        if self._greedy is None and Mask() in self._known:  # else the first batch scores the dense model
            self.dense_ppl = self._known[Mask()]
        self._greedy_mask: Mask | None = None
        self._study: Any = None
        self._pending: tuple[str, tuple[Mask, ...]] | None = None
        self._asked: list[tuple[int, Mask]] = []  # trials of the pending proposal (twins included)
        self._resumed: list[tuple[int, Mask]] = []
        self._n_sampled = 0
        self._finished = False

    # ---- the study --------------------------------------------------------------------------------
    @property
    def study_name(self) -> str:
        """Names the space and the sampler: another target or sampler is another study."""
        a, s = self.arch, self.space
        key = json.dumps([a.num_layers, a.hidden_size, a.intermediate_size, a.num_kv_heads, a.vocab_size,
                          s.target_ratio, s.tolerance, [(c.name, c.step) for c in s.choices], self.sampler_name])
        return f"rayprune-{self.sampler_name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"

    def _directions(self) -> list[str]:
        return ["minimize", "maximize"] if self.sampler_name == "nsga2" else ["minimize"]

    def _values(self, mask: Mask, ppl: float) -> list[float]:
        return [ppl, ratio(mask, self.arch)] if self.sampler_name == "nsga2" else [ppl]

    def _open_study(self) -> None:
        import optuna
        from optuna.storages import InMemoryStorage
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        from optuna.storages.journal._base import BaseJournalSnapshot
        from optuna.trial import TrialState, create_trial

        from .band_sampler import BandSampler, distributions

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self.storage_path is None:
            storage = InMemoryStorage()
        else:
            self.storage_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.storage_path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))  # owner only
            backend = JournalFileBackend(str(self.storage_path))
            # The file journal is JSON lines; a snapshot backend would unpickle what it reads back.
            if isinstance(backend, BaseJournalSnapshot):
                raise RuntimeError("this Optuna's file journal restores pickled snapshots; pin optuna==5.0.0")
            storage = JournalStorage(backend)
        study = optuna.create_study(storage=storage, study_name=self.study_name, directions=self._directions(),
                                    sampler=optuna.samplers.RandomSampler(self.seed), load_if_exists=True)
        trials = study.get_trials(deepcopy=False)
        # Reseeded by history: a resumed study does not replay the draws it started with.
        study.sampler = BandSampler(self._base_sampler(self.seed + len(trials)), self.space, self.seed, self._prior())
        self._study = study
        self._n_sampled = sum(t.user_attrs.get("origin") == "sampler" for t in trials)
        for t in trials:  # left running by a stopped campaign: propose again (the cache may hold them)
            if t.state != TrialState.RUNNING:
                continue
            if set(t.params) == {c.name for c in self.space.choices}:
                self._resumed.append((t.number, self.space.mask(t.params)))
            else:
                study.tell(t.number, state=TrialState.FAIL)
        if trials:
            return
        dists = distributions(self.space)
        seeds = []
        for mask, ppl in sorted(self._known.items(), key=lambda kv: kv[0].to_json()):
            params = self.space.params(mask)
            if mask == self._greedy_mask or params is None or not math.isfinite(ppl) or not self.space.contains(mask):
                continue
            seeds.append(create_trial(params=params, distributions=dists, values=self._values(mask, ppl),
                                      user_attrs={"origin": "cache"}))
        study.add_trials(seeds)
        if self._greedy_mask is not None:
            study.enqueue_trial(self.space.params(self._greedy_mask), user_attrs={"origin": "blockpruner"})

    def _prior(self) -> dict[str, float]:
        """Each choice's single-removal perplexity, where the cache or the warm start has it: the
        order in which the repair restores or removes blocks (``BandSampler``)."""
        full = {c.name: c.full for c in self.space.choices}
        prior = {}
        for c in self.space.choices:
            ppl = self._known.get(self.space.mask({**full, c.name: 0}))
            if ppl is not None:
                prior[c.name] = ppl
        return prior

    def _raise_floor(self) -> None:
        """After the warm start, the band starts at the greedy mask's ratio (same width): every trial
        removes at least as much as greedy, so a lower perplexity is never just less removal."""
        greedy = ratio(self._greedy_mask, self.arch)
        if greedy > self.space.target_ratio:
            self.space = MaskSpace(self.arch, greedy, self.space.tolerance, **self._space_options)
            log.info("optuna: the ratio band starts at BlockPruner's ratio, %.4f..%.4f", *self.space.band)

    def _base_sampler(self, seed: int) -> Any:
        import optuna

        if self.sampler_name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, self.trials // 4)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                              n_startup_trials=min(10, max(2, self.trials // 5)))

    def _ask(self) -> list[tuple[int, Mask]]:
        """Up to ``batch`` new masks; trials whose mask is known are told at once (not proposed)."""
        from optuna.trial import TrialState

        fresh: list[tuple[int, Mask]] = []
        self._asked, proposed = [], set()
        for number, mask in self._resumed:  # trials a stopped campaign left running
            if mask in self._known:
                self._tell(number, mask, self._known[mask])
                continue
            self._asked.append((number, mask))
            if mask not in proposed:
                fresh.append((number, mask))
                proposed.add(mask)
        self._resumed = []
        for attempt in range(20 * self.batch):  # a sampler that only repeats itself ends the search
            if len(fresh) >= self.batch or self._n_sampled >= self.trials:
                break
            trial = self._study.ask()
            params = {c.name: trial.suggest_int(c.name, 0, c.full, step=c.step) for c in self.space.choices}
            mask = self.space.mask(params)
            if not self.space.contains(mask):  # only an enqueued trial can be off the band
                self._study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d (enqueued) lies outside the ratio band %s: not evaluated", trial.number,
                            self.space.band)
                continue
            if "origin" not in trial.user_attrs:
                trial.set_user_attr("origin", "repeat" if mask in self._known or mask in proposed else "sampler")
            if mask in self._known:
                self._tell(trial.number, mask, self._known[mask])
            elif mask in proposed:
                self._asked.append((trial.number, mask))  # a twin in this batch: told with it
            else:
                self._n_sampled += trial.user_attrs.get("origin") == "sampler"
                fresh.append((trial.number, mask))
                self._asked.append((trial.number, mask))
                proposed.add(mask)
        return fresh

    def _tell(self, number: int, mask: Mask, ppl: float) -> None:
        from optuna.trial import TrialState

        if math.isfinite(ppl):
            self._study.tell(number, self._values(mask, ppl))
            return
        warnings.warn(f"trial {number}: mask {mask} scored {ppl}; told to Optuna as a failed trial",
                      FailedTrialWarning, stacklevel=3)
        self._study.tell(number, state=TrialState.FAIL)

    # ---- the Searcher interface -------------------------------------------------------------------
    def suggest(self) -> Proposal | None:
        if self._pending is not None:
            raise RuntimeError("suggest() called twice: observe() the scores of the last proposal first")
        if self._finished:
            return None
        if self._greedy is not None and self._greedy_mask is None:
            proposal = self._greedy.suggest()
            if proposal is not None:
                self._pending = ("greedy", proposal.masks)
                return Proposal(proposal.masks, proposal.base, f"blockpruner {proposal.label}")
            self._greedy_mask, self.dense_ppl = self._greedy.current, self._greedy.dense_ppl
            self._raise_floor()
        if self._study is None:
            self._open_study()
        masks = [m for _, m in self._ask()]
        if self.dense_ppl is None and Mask() not in masks:
            masks.insert(0, Mask())  # the first batch also scores the dense model
        if not masks:
            self._finish()
            return None
        self._pending = ("trials", tuple(masks))
        first = min((n for n, _ in self._asked), default=0)
        return Proposal(tuple(masks), None, f"optuna trials {first}+ ({self._n_sampled}/{self.trials} sampled)")

    def observe(self, scores: Mapping[Mask, float]) -> None:
        if self._pending is None:
            raise RuntimeError("observe() called without a pending suggest()")
        phase, masks = self._pending
        missing = [m for m in masks if m not in scores]
        if missing:
            raise KeyError(f"observe() got no score for {len(missing)} proposed mask(s), e.g. {missing[0]}; pass "
                           f"one for every mask of the proposal (NaN for a failed evaluation)")
        self._pending = None
        self._known.update((m, scores[m]) for m in masks)
        if phase == "greedy":
            self._greedy.observe(scores)
            self.path = list(self._greedy.path)
            return
        if self.dense_ppl is None:
            self.dense_ppl = scores[Mask()]
        for number, mask in self._asked:
            self._tell(number, mask, scores[mask])
        self._asked = []
        best = self._best()
        if best is not None:
            log.info("optuna: %d/%d masks sampled, best ppl %.3f at ratio %.4f (trial %d)", self._n_sampled,
                     self.trials, best.values[0], ratio(self.space.mask(best.params), self.arch), best.number)

    # ---- results ----------------------------------------------------------------------------------
    def _best(self) -> Any:
        from optuna.trial import TrialState

        done = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min(done, key=lambda t: (t.values[0], t.number)) if done else None

    def _finish(self) -> None:
        self._finished = True
        best = self._best()
        self.path = list(self._greedy.path) if self._greedy is not None else []
        if best is None:
            return
        mask = self.space.mask(best.params)
        greedy_ppl = self._known.get(self._greedy_mask, math.inf) if self._greedy_mask is not None else math.inf
        if mask != self._greedy_mask and best.values[0] < greedy_ppl:
            self.path.append(Step(step=len(self.path) + 1, kind="trial", layer=best.number, ppl=best.values[0],
                                  ratio=ratio(mask, self.arch), mask=mask, params=param_count(mask, self.arch)))

    def references(self) -> dict[str, Mask]:
        """Masks the campaign should also score on held-out windows: the greedy mask, if any."""
        return {} if self._greedy_mask is None else {"blockpruner": self._greedy_mask}

    def summary(self) -> dict[str, Any]:
        """Everything ``search.json`` and the report need: band, counts, greedy vs best, every trial."""
        from optuna.trial import TrialState

        trials = self._study.get_trials(deepcopy=False) if self._study is not None else []
        points = []
        for t in trials:
            if set(t.params) != {c.name for c in self.space.choices}:
                continue
            mask = self.space.mask(t.params)
            ppl = t.values[0] if t.state == TrialState.COMPLETE else None
            points.append({"trial": t.number, "origin": t.user_attrs.get("origin", "sampler"), "ppl": ppl,
                           "ratio": ratio(mask, self.arch), "state": t.state.name})
        counts: dict[str, int] = {}
        for p in points:
            key = "failed" if p["state"] == "FAIL" else p["origin"]
            counts[key] = counts.get(key, 0) + 1
        best = self._best() if self._study is not None else None

        def entry(mask: Mask | None, ppl: float | None, number: int | None) -> dict[str, Any] | None:
            if mask is None:
                return None
            return {"trial": number, "ppl": ppl, "ratio": ratio(mask, self.arch), "mask": mask.to_dict()}

        greedy_trial = next((p["trial"] for p in points if p["origin"] == "blockpruner"), None)
        greedy = entry(self._greedy_mask, self._known.get(self._greedy_mask), greedy_trial) if self._greedy_mask else None
        top = entry(self.space.mask(best.params), best.values[0], best.number) if best is not None else None
        return {
            "method": "optuna", "sampler": self.sampler_name, "seed": self.seed, "study_name": self.study_name,
            "storage": None if self.storage_path is None else self.storage_path.name,
            "band": list(self.space.band), "widths": self.space.widths, "trials_budget": self.trials,
            "batch": self.batch, "counts": counts, "blockpruner": greedy, "best": top,
            "improved": None if greedy is None or top is None else bool(top["ppl"] < greedy["ppl"]), "points": points,
        }
