"""A SPRINT step on the whole pool: window shards on every replica, sums added up on the driver.

Everything a step computes is a sum over windows: the state's NLL, each candidate's sensitivity
(a sum over sequences) and each refit's normal equations (``Z^T Z``, ``Z^T R``, ``R^T R``). With
more than one replica, :class:`PoolStep` cuts the windows into one shard per replica (at batch
boundaries) and runs the step in phases (``Evaluator.sprint_shard`` / ``sprint_solve``):

1. ``scores`` on every shard; the driver adds NLL and sensitivities (``math.fsum``: exactly rounded,
   so the arrival order changes no bit) and ranks the candidates (the searcher's own arithmetic);
2. ``moments`` of the refits of the top candidates without a remembered score, on every shard, added
   in float64 in shard order;
3. one ``sprint_solve`` per refit, spread over the replicas (each solves against its current
   ``down_proj``, the same on every replica); the solved weights go to content-addressed files in the
   run directory (``sprint/weights/<sha>.safetensors``);
4. ``rescore`` with the refitted weights on every shard, added up; the choice is made on the driver,
   among these and the remembered scores (``search_spaces.sprint.tuned_records``). A remembered
   winner has its refit summed and solved again (2 and 3 for it alone): its window is unchanged.

A phase goes back to the replica that ran the shard before (``Task.prefer``), whose memo holds the
shard's streams; any other replica gives the same numbers (it walks again). Replicas find refitted
weights by path (the run directory, when they can see it) and get an ``ObjectRef`` only when they
cannot (:class:`WeightSources`): the object store carries a weight only to a replica that lacks a
shared filesystem, once. With one replica (or one batch of windows) the step is one
``sprint_step`` call, which keeps its whole walk in memory between phases.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from search_spaces.sprint import (StepRequest, best_tuned, refit_candidates, refit_targets, top_candidates,
                                  tuned_records)
from search_spaces.tiling import window_shards

from .dispatch import Call

if TYPE_CHECKING:
    import numpy as np

    from .dispatch import Dispatcher
    from .rundir import StepStore


class WeightSources:
    """Where replicas find refitted weights: the step store's files, or object references made on
    demand (once per weight and run) for replicas that cannot read them."""

    def __init__(self, store: StepStore) -> None:
        self.store = store
        self.refs: dict[str, Any] = {}

    def paths(self, shas: Iterable[str]) -> dict[str, Any]:
        return {sha: self.refs.get(sha, str(self.store.weight_path(sha))) for sha in shas}

    def by_reference(self, shas: Iterable[str]) -> None:
        """From now on, send ``shas`` as object references (a replica could not read their files)."""
        import ray

        for sha in shas:
            if sha in self.refs:
                raise RuntimeError(f"an evaluator could not use refitted weights {sha} even sent by reference; "
                                   f"the run directory's sprint/weights/ is corrupt: remove the file and rerun")
            self.refs[sha] = ray.put(self.store.load_weight(sha))


class PoolStep:
    """Runs SPRINT step requests on a dispatcher's pool (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, store: StepStore, *, num_layers: int, n_windows: Mapping[str, int],
                 batch_size: int, timeout_s: float) -> None:
        self.dispatcher, self.store, self.num_layers = dispatcher, store, num_layers
        self.sources = WeightSources(store)
        self.n_windows, self.batch_size, self.timeout_s = dict(n_windows), batch_size, timeout_s

    def shards(self, window_set: str) -> list[tuple[int, int]]:
        """One window range per replica, cut at batch boundaries (one range: run the step whole)."""
        n = self.n_windows.get(window_set)
        if n is None:
            return [(0, 0)]
        return window_shards(n, self.batch_size, len(self.dispatcher.actors), len(self.dispatcher.actors))

    def run(self, request: StepRequest) -> dict[str, Any]:
        """The step's result, in the shape ``Evaluator.sprint_step`` returns it."""
        shards = self.shards(request.window_set)
        body = request.to_dict()
        tuned = [sha for _, sha in request.tuned]
        if len(shards) < 2:
            return self._whole(body, tuned)
        scores = self._phase("scores", body, shards, tuned)
        sens = {s: math.fsum(p["sensitivity"][s] for p in scores) for s in scores[0]["sensitivity"]}
        result: dict[str, Any] = {
            "state": scores[0]["state"], "nll_sum": math.fsum(p["nll_sum"] for p in scores),
            "tokens": sum(p["tokens"] for p in scores), "walk_start": min(p["walk_start"] for p in scores),
            "sensitivity": sens, "top": [], "tuned": [], "choice": None,
            "seconds": max(p["seconds"] for p in scores), "worker": ",".join(sorted({p["worker"] for p in scores})),
            "shards": len(shards)}
        ranked = {**dict(request.known), **sens}
        if request.top_k <= 0 or not ranked:
            return result
        top = top_candidates(ranked, request.costs, request.top_k)
        fits, weights = self._refits(request, body, shards, tuned, refit_candidates(request, top), {"last": False})
        rescored: dict[int, float] = {}
        if weights:
            # A remembered winner's refit may follow the rescore: the replicas keep the streams till then.
            payload = {"weights": {str(s): sha for s, (sha, _) in weights.items()}, "last": not request.remembered}
            parts = self._phase("rescore", body, shards, tuned + [sha for sha, _ in weights.values()], payload)
            rescored = {s: math.fsum(p["sensitivity"][s] for p in parts) for s in weights}
        records = tuned_records(request, self.num_layers, top, ranked, fits, rescored)
        chosen = best_tuned(records, request.costs)
        solved = {s for s, _ in weights.values()}
        if chosen["status"] == "remembered":  # its refit again, from the same sums
            fits, weights = self._refits(request, body, shards, tuned, [chosen["block"]], {"last": True})
        sha, weight = weights.get(chosen["block"], (None, None))
        self._discard(solved - {sha} - set(tuned))
        choice = {**chosen, **fits.get(chosen["block"], {}), "sha": sha, "weight": weight}
        return {**result, "top": top, "tuned": records, "choice": choice}

    def _whole(self, body: dict[str, Any], shas: list[str]) -> dict[str, Any]:
        """The step as one ``sprint_step`` call (the dispatcher's ``call``: retried like any task)."""
        while True:
            out = self.dispatcher.call("sprint_step", body, self.sources.paths(shas), timeout_s=self.timeout_s)
            if not out.get("need_weights"):
                return out
            self.sources.by_reference(out["need_weights"])

    # ---- phases --------------------------------------------------------------------------------------
    def _refits(self, request: StepRequest, body: dict[str, Any], shards: list[tuple[int, int]], tuned: list[str],
                top: list[int], last: dict[str, bool],
                ) -> tuple[dict[int, dict[str, Any]], dict[int, tuple[str, np.ndarray]]]:
        """Each refit's status/before/after, and the ok ones' (sha, weight), saved in the step store.
        ``last``: whether the ``moments`` phase is the step's last on the replicas (payload)."""
        import numpy as np

        if not refit_targets(request.mask, self.num_layers, top):
            return {}, {}
        parts = self._phase("moments", body, shards, tuned, {"top": top, **last})
        moments = {}
        for s in parts[0]["moments"]:  # shard order, float64: the same sums whichever replica ran what
            shard = [p["moments"][s] for p in parts]
            moments[s] = {"zz": sum((np.asarray(m["zz"], np.float64) for m in shard[1:]),
                                    np.asarray(shard[0]["zz"], np.float64)),
                          "zr": sum((np.asarray(m["zr"], np.float64) for m in shard[1:]),
                                    np.asarray(shard[0]["zr"], np.float64)),
                          "rr": math.fsum(m["rr"] for m in shard), "tokens": sum(m["tokens"] for m in shard)}
        order = sorted(moments)
        solved = self._calls([(lambda src, i=i, s=s: ("sprint_solve", (body, src, s, moments[s]), i))
                              for i, s in enumerate(order)], tuned)
        fits, weights = {}, {}
        for s, out in zip(order, solved):
            fits[s] = {"status": out["status"], "before": out["before"], "after": out["after"]}
            if out["status"] == "ok":
                self.store.save_weight(out["weight"], out["sha"])  # verifies the content against its sha
                weights[s] = (out["sha"], out["weight"])
        return fits, weights

    def _phase(self, phase: str, body: dict[str, Any], shards: list[tuple[int, int]], shas: list[str],
               payload: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """One phase on every shard (shard i preferring replica i); results in shard order."""
        return self._calls([(lambda src, i=i, rows=rows: ("sprint_shard", (phase, body, list(rows), src, payload), i))
                            for i, rows in enumerate(shards)], shas)

    def _calls(self, makers: Sequence[Callable[[dict[str, Any]], tuple[str, tuple[Any, ...], int | None]]],
               shas: list[str]) -> list[dict[str, Any]]:
        """Run one call per maker (given the weights' sources) on the pool, in parallel; a call answered
        with ``need_weights`` runs again with those weights sent by reference. Results in order."""
        results: dict[int, dict[str, Any]] = {}
        pending = list(range(len(makers)))
        while pending:
            sources = self.sources.paths(shas)
            tasks = {}
            for i in pending:
                method, args, prefer = makers[i](sources)
                tasks[i] = Call("", [], timeout_s=self.timeout_s, method=method, args=args, prefer=prefer)
            ids = {id(task): i for i, task in tasks.items()}
            need: set[str] = set()
            pending = []
            for outcome in self.dispatcher.run(list(tasks.values())):
                i = ids[id(outcome.task)]
                if outcome.error is not None:
                    raise RuntimeError(f"{tasks[i].method} failed {self.dispatcher.max_attempts} times "
                                       f"({outcome.error}); the evaluators' Ray logs say why; raise "
                                       f"cluster.max_attempts or cluster.eval_timeout_s")
                if outcome.rows.get("need_weights"):
                    need.update(outcome.rows["need_weights"])
                    pending.append(i)
                else:
                    results[i] = outcome.rows
            if need:
                self.sources.by_reference(need)
            pending.sort()
        return [results[i] for i in range(len(makers))]

    def _discard(self, shas: set[str]) -> None:
        """Refitted weights of candidates not chosen: needed only within their step."""
        for sha in shas:
            self.store.discard_weight(sha)
