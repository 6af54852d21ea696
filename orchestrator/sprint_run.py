"""SPRINT on the campaign's spine: the latency table, one remote step at a time, the step store.

SPRINT is sequential: a step runs on the whole pool (:class:`~orchestrator.sprint_pool.PoolStep`),
its windows cut into one shard per replica and its sums (NLL, sensitivities, the refits' normal
equations) added up on the driver; with one replica it is one remote call (``sprint_step``), on the
same evaluator while it lives, so its checkpoint memo saves the prefix of the walk. Any other replica
gives the same numbers, and a dead or hung one is retried like any task. What the run directory
keeps (:class:`~orchestrator.rundir.StepStore`):

- ``sprint/latency.json``: the latency table the ranking used (measured on an evaluator, cached
  per device and model under ``cache_dir()/latency/``) and the scenario (SPRINT's: a 1,024-token
  prompt and 512 generated tokens; a CPU test sets a small one); the searcher estimates latency as
  the sum of the kept blocks' costs, SPRINT's arithmetic, unless ``search.sprint.latency_fixed``;
- ``sprint/steps/<key>.json``: every step result, keyed by its request's content, so a rerun
  replays the search without a forward pass and a larger target resumes where it stopped;
- ``sprint/weights/<sha256>.safetensors``: every refitted ``down_proj`` kept on the path; ``path.json``
  names them per step (``tuned_weights``), so any prefix of the path can be exported.

The perplexity of every state on the path goes to the Parquet cache like any evaluation
(:meth:`~orchestrator.scorer.Scorer.record`), keyed by the mask and a model fingerprint that
includes the refitted weights (``+tuned:<sha256>``).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Mapping

from search_spaces import Mask, perplexity
from search_spaces.latency import LatencyTable, Scenario, check_costs, mask_latency
from search_spaces.sprint import StepRequest, Tuned, tuned_fingerprint, tuned_items

from .search import Proposal
from .search.sprint import SprintSearcher
from .sprint_pool import PoolStep

if TYPE_CHECKING:
    import numpy as np

    from search_spaces.latency import BlockCosts

    from .config import Config
    from .rundir import RunDir
    from .scorer import Scorer

log = logging.getLogger("rayprune")


def _jsonable(result: Mapping[str, Any]) -> dict[str, Any]:
    """A step result as JSON data (weights left out), exactly as a replay reads it back."""
    out = {k: v for k, v in result.items() if k != "choice"}
    out["sensitivity"] = {str(k): float(v) for k, v in result["sensitivity"].items()}
    if result.get("choice") is not None:
        out["choice"] = {k: v for k, v in result["choice"].items() if k != "weight"}
    return json.loads(json.dumps(out))


class SprintRun:
    """Answers a :class:`SprintSearcher`'s step requests and records everything it needs."""

    def __init__(self, config: Config, scorer: Scorer, rundir: RunDir) -> None:
        self.config, self.scorer, self.rundir = config, scorer, rundir
        self.arch, self.store = scorer.arch, rundir.steps
        self.costs: BlockCosts | None = None
        self.table: LatencyTable | None = None
        self.scenario: Scenario | None = None
        s = config.search.sprint
        self.timeout_s = config.cluster.eval_timeout_s * (2 + s.top_k)
        self.pool = PoolStep(scorer.dispatcher, self.store, num_layers=self.arch.num_layers,
                             n_windows={name: shape[0] for name, shape in scorer.window_shapes.items()},
                             batch_size=scorer.batch_size or config.search.batch_size, timeout_s=self.timeout_s)

    def _call(self, method: str, *args: Any) -> Any:
        return self.scorer.dispatcher.call(method, *args, timeout_s=self.timeout_s)

    # ---- the searcher, ranked by measured latency ---------------------------------------------------
    def searcher(self) -> SprintSearcher:
        if self.config.search.method != "sprint":
            raise TypeError(f"search.method {self.config.search.method} does not run SPRINT steps")
        s = self.config.search.sprint
        scenario = Scenario(s.latency_prompt, s.latency_generate)
        table = LatencyTable.from_dict(self._call("latency_table", scenario.prompt, scenario.generate,
                                                  s.latency_repeats))
        for problem in check_costs([(k, table.costs[k]) for k in (table.key(*e) for e in scenario.entries())]):
            log.warning("latency table: %s", problem)
        self.store.write_latency({"scenario": {"prompt": scenario.prompt, "generate": scenario.generate},
                                  **table.to_dict()})
        searcher = SprintSearcher.from_search(self.config.search, self.arch, table.scenario_costs(scenario))
        self.table, self.scenario, self.costs = table, scenario, searcher.costs
        costs = searcher.costs
        log.info("latency (%s, %s): dense %.4f s, attention block %.2f ms, MLP block %.2f ms, fixed %.2f ms",
                 table.device, scenario, mask_latency(Mask(), self.arch, costs), costs.attn * 1e3,
                 costs.mlp * 1e3, costs.fixed * 1e3)
        return searcher

    # ---- one step -----------------------------------------------------------------------------------
    def run_request(self, request: StepRequest) -> tuple[float, dict[str, Any] | None]:
        """(perplexity of the request's state, step result or None for scoring-only requests)."""
        scorer = self.scorer
        # The state's perplexity depends on the kept MLPs' refits only (removed ones may be named too).
        model_fp = scorer.model_fingerprint + tuned_fingerprint(tuned_items(request.tuned, request.mask))
        row_key = scorer.key(request.mask, request.window_set, model_fp)
        windows_fp = scorer.fingerprints[request.window_set]
        in_cache = scorer.cache.get(row_key, model_fp=model_fp, calibration_fp=windows_fp) is not None
        if request.top_k == 0 and in_cache:
            return scorer.cached(request.mask, request.window_set, model_fp), None
        key = request.key(scorer.model_fingerprint, windows_fp)
        result = self.store.get(key)
        if result is None:
            raw = self.pool.run(request)
            choice = raw.get("choice") or {}
            if choice.get("weight") is not None:
                self.store.save_weight(choice["weight"], choice["sha"])
            result = _jsonable(raw)
            self.store.put(key, result)
            scorer.counters.evaluated += 1
            scorer.counters.computed(int(result["tokens"]), request.window_set, key)
        else:
            scorer.counters.served(result, request.window_set, key)
        ppl = perplexity(result["nll_sum"], result["tokens"])
        if not in_cache:
            scorer.record(request.mask, request.window_set, result, None, model_fingerprint=model_fp,
                          latency=mask_latency(request.mask, self.arch, request.costs), count=False)
            scorer.cache.flush()
        return ppl, (result if request.top_k else None)

    def answer(self, searcher: SprintSearcher, proposal: Proposal) -> None:
        ppl, step = self.run_request(proposal.request)
        searcher.observe({proposal.masks[0]: ppl}, step=step)
        done = searcher.path[-1] if searcher.path else None
        if step is not None and done is not None:
            refit = done.refit or {}
            log.info("step %d: remove %s %d (sensitivity %.4f%s) -> ratio %.4f, est. speedup %.3fx; "
                     "ppl before it %.3f", done.step, done.kind, done.layer, done.sensitivity,
                     f", refit mlp {refit['layer']}: {refit['status']}" if refit else "", done.ratio,
                     done.speedup, ppl)

    # ---- after the search ---------------------------------------------------------------------------
    def heldout(self, searcher: SprintSearcher) -> dict[str, float]:
        if searcher.path:
            log.info("final model: ppl %.3f, ratio %.4f, est. speedup %.3fx", searcher.path[-1].ppl,
                     searcher.path[-1].ratio, searcher.path[-1].speedup)

        def ppl(mask: Mask, tuned: Tuned) -> float:
            return self.run_request(StepRequest("evaluation", mask, tuned, costs=self.costs, top_k=0))[0]

        return {"dense_ppl": ppl(Mask(), ()), "pruned_ppl": ppl(searcher.current, searcher.tuned)}

    def extras(self, searcher: SprintSearcher) -> dict[str, Any]:
        """``path.json``'s SPRINT figures, and the refitted weights the export carries."""
        scenario = {"prompt": self.scenario.prompt, "generate": self.scenario.generate}
        return {"path": {"target_speedup": self.config.search.target_speedup,
                         "sprint": {"scenario": scenario, "latency": self.table.to_dict(), "costs": vars(self.costs),
                                    "latency_fixed": self.config.search.sprint.latency_fixed,
                                    "speedup": searcher.speedup(), "top_k": searcher.top_k, "ridge": searcher.ridge,
                                    "checkpoint_every": searcher.checkpoint_every, **searcher.options,
                                    "memory": searcher.memory}},
                "export": {"tuned": self.tuned_arrays(searcher.tuned)}}

    def tuned_arrays(self, tuned: Tuned) -> dict[int, np.ndarray]:
        return {layer: self.store.load_weight(sha) for layer, sha in tuned}
