"""SPRINT inside a campaign: the latency table, one remote step at a time, the step store, held-out.

SPRINT is sequential and each step is cheap, so a step is one remote call (``sprint_step``) on one
evaluator, the same one while it lives (its checkpoint memo then saves the prefix of the walk; any
other evaluator gives the same numbers). What the campaign keeps, in ``<run>/sprint/``:

- ``latency.json``: the latency table the ranking used (measured on an evaluator, cached per device
  and model under ``cache_dir()/latency/``) and the scenario;
- ``steps/<key>.json``: every step result, keyed by its request's content, so a rerun replays the
  search without a forward pass and a larger target resumes where it stopped;
- ``weights/<sha256>.safetensors``: every refitted ``down_proj`` kept on the path, by content hash;
  ``path.json`` names them per step (``tuned_weights``), so any prefix of the path can be exported
  (:func:`export_step`).

The perplexity of every state on the path goes to the Parquet cache like any evaluation, keyed by
the mask and a model fingerprint that includes the refitted weights (``+tuned:<sha256>``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from search_spaces import Mask, mask_key, param_count, ratio
from search_spaces.latency import LatencyTable, Scenario, check_costs, mask_latency
from search_spaces.sprint import StepRequest, Tuned, tensor_key, tuned_fingerprint

from .search import make_searcher
from .search.sprint import SprintSearcher

if TYPE_CHECKING:
    from .campaign import Campaign, CampaignResult

log = logging.getLogger("rayprune")
Call = Callable[..., Any]  # call(method, *args) -> result, on one evaluator


class StepStore:
    """``<run>/sprint/``: step results by request key, refitted weights by content hash."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir) / "sprint"
        (self.root / "steps").mkdir(parents=True, exist_ok=True)
        (self.root / "weights").mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        file = self.root / "steps" / f"{key}.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        _write_json(self.root / "steps" / f"{key}.json", result)

    def weight_path(self, sha: str) -> Path:
        return self.root / "weights" / f"{sha}.safetensors"

    def save_weight(self, array: np.ndarray, sha: str) -> None:
        """Store ``array`` under ``sha``; ValueError when the content does not hash to it."""
        from safetensors.numpy import save_file

        array = np.ascontiguousarray(array, dtype=np.float32)
        if tensor_key(array.shape, "float32", array.tobytes()) != sha:
            raise ValueError(f"refitted weights do not hash to {sha}; the evaluator sent corrupted data, rerun")
        path = self.weight_path(sha)
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"weight": array}, str(tmp))
            os.replace(tmp, path)

    def load_weight(self, sha: str) -> np.ndarray:
        from safetensors.numpy import load_file

        path = self.weight_path(sha)
        if not path.is_file():
            raise FileNotFoundError(f"refitted weights {sha} are not in {path.parent}; the run directory is "
                                    f"incomplete: rerun the campaign to recompute them")
        return load_file(str(path))["weight"]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _jsonable(result: Mapping[str, Any]) -> dict[str, Any]:
    """A step result as JSON data (weights left out), exactly as a replay reads it back."""
    out = {k: v for k, v in result.items() if k != "choice"}
    out["sensitivity"] = {str(k): float(v) for k, v in result["sensitivity"].items()}
    if result.get("choice") is not None:
        out["choice"] = {k: v for k, v in result["choice"].items() if k != "weight"}
    return json.loads(json.dumps(out))


class SprintRun:
    """Runs a :class:`SprintSearcher` to its end with ``call`` and records everything it needs."""

    def __init__(self, campaign: Campaign, call: Call) -> None:
        self.campaign, self.call = campaign, call
        self.config, self.arch = campaign.config, campaign.arch
        self.store = StepStore(campaign.run_dir)

    # ---- pieces ---------------------------------------------------------------------------------------
    def latency(self) -> tuple[LatencyTable, Scenario]:
        s = self.config.search.sprint
        scenario = Scenario(s.latency_prompt, s.latency_generate)
        table = LatencyTable.from_dict(self.call("latency_table", scenario.prompt, scenario.generate,
                                                 s.latency_repeats))
        for problem in check_costs([(k, table.costs[k]) for k in (table.key(*e) for e in scenario.entries())]):
            log.warning("latency table: %s", problem)
        _write_json(self.store.root / "latency.json",
                    {"scenario": {"prompt": scenario.prompt, "generate": scenario.generate}, **table.to_dict()})
        return table, scenario

    def searcher(self, table: LatencyTable, scenario: Scenario) -> SprintSearcher:
        searcher = make_searcher(self.config.search, self.arch, costs=table.scenario_costs(scenario))
        assert isinstance(searcher, SprintSearcher)
        return searcher

    def _fingerprint(self, tuned: Tuned) -> str:
        return self.campaign.model_fingerprint + tuned_fingerprint(tuned)

    def run_request(self, request: StepRequest) -> tuple[float, dict[str, Any] | None]:
        """(perplexity of the request's state, step result or None for scoring-only requests)."""
        c = self.campaign
        windows_fp = c.fingerprints[request.window_set]
        row_key = mask_key(request.mask, self._fingerprint(request.tuned), windows_fp)
        row = c.cache.get(row_key)
        if request.top_k == 0 and row is not None:
            c.counters.cached += 1
            return row["ppl"], None
        key = request.key(c.model_fingerprint, windows_fp)
        result = self.store.get(key)
        if result is None:
            arrays = [self.store.load_weight(sha) for _, sha in request.tuned]
            raw = self.call("sprint_step", request.to_dict(), *arrays)
            choice = raw.get("choice") or {}
            if choice.get("weight") is not None:
                self.store.save_weight(choice["weight"], choice["sha"])
            result = _jsonable(raw)
            self.store.put(key, result)
            c.counters.evaluated += 1
        else:
            c.counters.cached += 1
        ppl = _perplexity(result["nll_sum"], result["tokens"])
        if row is None:
            c.cache.add({"key": row_key, "mask_json": request.mask.to_json(), "model_fp": self._fingerprint(request.tuned),
                         "calibration_fp": windows_fp, "nll_sum": result["nll_sum"], "tokens": result["tokens"],
                         "ppl": ppl, "params_kept": param_count(request.mask, self.arch),
                         "ratio": ratio(request.mask, self.arch),
                         "latency_est": mask_latency(request.mask, self.arch, request.costs),
                         "seconds": result.get("seconds"), "worker": result.get("worker"),
                         "status": "ok", "error": None})
            c.cache.flush()
        return ppl, (result if request.top_k else None)

    # ---- the whole search ---------------------------------------------------------------------------
    def run(self) -> tuple[SprintSearcher, dict[str, float], dict[str, Any]]:
        table, scenario = self.latency()
        searcher = self.searcher(table, scenario)
        costs = searcher.costs
        log.info("latency (%s, %s): dense %.4f s, attention block %.2f ms, MLP block %.2f ms, fixed %.2f ms",
                 table.device, scenario, mask_latency(Mask(), self.arch, costs), costs.attn * 1e3,
                 costs.mlp * 1e3, costs.fixed * 1e3)
        while (proposal := searcher.suggest()) is not None:
            ppl, step = self.run_request(proposal.request)
            searcher.observe({proposal.masks[0]: ppl}, step=step)
            done = searcher.path[-1] if searcher.path else None
            if step is not None and done is not None:
                refit = done.refit or {}
                log.info("step %d: remove %s %d (sensitivity %.4f%s) -> ratio %.4f, est. speedup %.3fx; "
                         "ppl before it %.3f", done.step, done.kind, done.layer, done.sensitivity,
                         f", refit mlp {refit['layer']}: {refit['status']}" if refit else "", done.ratio,
                         done.speedup, ppl)
        if searcher.path:
            log.info("final model: ppl %.3f, ratio %.4f, est. speedup %.3fx", searcher.path[-1].ppl,
                     searcher.path[-1].ratio, searcher.path[-1].speedup)
        heldout = self.heldout(searcher, costs)
        extra = {"path": {"target_speedup": self.config.search.target_speedup,
                          "sprint": {"scenario": {"prompt": scenario.prompt, "generate": scenario.generate},
                                     "latency": table.to_dict(), "costs": vars(costs),
                                     "speedup": searcher.speedup(), "top_k": searcher.top_k,
                                     "ridge": searcher.ridge, "checkpoint_every": searcher.checkpoint_every}},
                 "export": {"tuned": self.tuned_arrays(searcher.tuned)}}
        return searcher, heldout, extra

    def heldout(self, searcher: SprintSearcher, costs: Any) -> dict[str, float]:
        def ppl(mask: Mask, tuned: Tuned) -> float:
            return self.run_request(StepRequest("evaluation", mask, tuned, costs=costs, top_k=0))[0]

        return {"dense_ppl": ppl(Mask(), ()), "pruned_ppl": ppl(searcher.current, searcher.tuned)}

    def tuned_arrays(self, tuned: Tuned) -> dict[int, np.ndarray]:
        return {layer: self.store.load_weight(sha) for layer, sha in tuned}


def _perplexity(nll_sum: float, tokens: int) -> float:
    if tokens <= 0 or not math.isfinite(nll_sum):
        return math.nan if tokens <= 0 or math.isnan(nll_sum) else math.inf
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def ray_call(actors: list, timeout_s: float, max_attempts: int) -> Call:
    """``call(method, *args)`` on the first live actor, sticky; a dead or hung actor is retried on the
    next one (Ray restarts it meanwhile) up to ``max_attempts``; an exception in the method is raised."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    state = {"index": 0}

    def call(method: str, *args: Any) -> Any:
        errors = []
        for _ in range(max_attempts):
            actor = actors[state["index"] % len(actors)]
            ref = getattr(actor, method).remote(*args)
            try:
                return ray.get(ref, timeout=timeout_s)
            except RayTaskError as exc:
                raise RuntimeError(f"evaluator {method} raised: {exc.cause!r}") from exc
            except GetTimeoutError:
                errors.append(f"timed out after {timeout_s:.0f} s")
                ray.kill(actor, no_restart=False)
            except RayActorError as exc:
                errors.append(f"evaluator died: {type(exc).__name__}")
            state["index"] += 1
            log.warning("%s failed (%s); retrying on evaluator %d", method, errors[-1], state["index"] % len(actors))
        raise RuntimeError(f"{method} failed {max_attempts} times ({'; '.join(errors)}); the evaluators' Ray "
                           f"logs say why; raise cluster.max_attempts or cluster.eval_timeout_s")

    return call


def run_sprint(campaign: Campaign, actors: list, t0: float) -> CampaignResult:
    """The campaign's SPRINT search on its evaluators, from its start at ``t0``; writes the outputs."""
    from .campaign import CampaignResult

    cluster = campaign.config.cluster
    timeout = cluster.eval_timeout_s * (2 + campaign.config.search.sprint.top_k)
    searcher, heldout, extra = SprintRun(campaign, ray_call(list(actors), timeout, cluster.max_attempts)).run()
    campaign.counters.seconds = time.perf_counter() - t0
    result = CampaignResult(campaign.run_dir, searcher, heldout, campaign.counters, campaign.counters.seconds, extra)
    campaign.write_outputs(result)
    return result


def export_step(run_dir: str | os.PathLike[str], step: int, out_dir: str | os.PathLike[str]) -> Path:
    """Export the model after ``step`` of a SPRINT run's path (0: dense), refitted weights included."""
    from .export import export_run

    return export_run(run_dir, step=step, out=out_dir)


def step_weights(run_dir: str | os.PathLike[str], entry: Mapping[str, Any]) -> dict[int, np.ndarray]:
    """MLP layer -> refitted ``down_proj`` of the model after a path step (``path.json`` entry);
    empty for steps without refits and for the other methods' paths."""
    names = entry.get("tuned_weights") or {}
    if not names:
        return {}
    store = StepStore(run_dir)
    return {int(layer): store.load_weight(sha) for layer, sha in names.items()}
