"""rayprune's SPRINT takes the path of SPRINT's own loop (tests/orchestrator/naive_sprint.py, written
from snudm-starlab/SPRINT's code) on tiny models: the same untuned scores, top candidates, memory of
tuned scores, tuned scores and choices, step after step; and SPRINT's speedup arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from actors.forward import LeanDecoder
from actors.sprint import Checkpoints, run_step
from orchestrator.config import SearchConfig, SprintConfig
from orchestrator.search.sprint import SprintSearcher
from search_spaces import Block, Mask, perplexity
from search_spaces.latency import BlockCosts, LatencyTable, Scenario, speedup
from tests.orchestrator.naive_sprint import NaiveSprint
from tests.tiny import tiny_arch, tiny_model

STEPS, RIDGE = 6, 4.0


def rayprune_path(family: str, windows: torch.Tensor, costs: BlockCosts, k: int, **options):
    """The searcher and the actor's step, chained in this process: [(request, result), ...] per step."""
    arch = tiny_arch(family)
    decoder = LeanDecoder(tiny_model(family), arch)
    searcher = SprintSearcher(arch, costs, max_steps=STEPS, top_k=k, ridge=RIDGE, checkpoint_every=1, **options)
    weights, memo, steps = {}, Checkpoints(), []
    while (proposal := searcher.suggest()) is not None:
        request = proposal.request
        result = run_step(decoder, windows, 4, request, weights, memo)
        choice = result["choice"]
        if choice is not None and choice["weight"] is not None:
            weights[choice["sha"]] = torch.as_tensor(choice["weight"])
        if request.top_k:
            steps.append((request, result))
        searcher.observe({proposal.masks[0]: perplexity(result["nll_sum"], result["tokens"])},
                         step=result if request.top_k else None)
    return searcher, steps


def _close(got: dict[int, float], expected: dict[int, float], rel: float) -> None:
    assert got.keys() == expected.keys()
    for s, value in expected.items():
        assert got[s] == pytest.approx(value, rel=rel), s


@pytest.mark.parametrize("family,seed,k,latency", [("llama", 1, 3, (2.0, 1.0)), ("qwen2", 2, 3, (1.0, 1.0))])
def test_rayprune_takes_the_path_of_sprints_loop(family, seed, k, latency):
    arch = tiny_arch(family)
    windows = torch.randint(0, arch.vocab_size, (8, 24), generator=torch.Generator().manual_seed(seed))
    attn, mlp = latency
    searcher, steps = rayprune_path(family, windows, BlockCosts(0.0, attn, mlp), k)
    naive = NaiveSprint(LeanDecoder(tiny_model(family), arch), windows, {"MHA": attn, "MLP": mlp}, k, RIDGE)
    assert len(steps) == STEPS
    seen = {"remembered winner": 0, "no-mlp in top": 0, "removed block in a window": 0, "refit of a removed MLP": 0}
    for (request, result), done in zip(steps, searcher.path):
        expected = naive.step()
        ranked = {**dict(request.known), **result["sensitivity"]}  # reused scores and fresh ones
        _close(ranked, expected.untuned, rel=1e-4)
        assert result["top"] == expected.top
        _close(dict(request.remembered), expected.remembered, rel=1e-4)
        assert [t["block"] for t in result["tuned"] if t["status"] != "remembered"] == expected.tuned_now
        pool = {t["block"]: t["sensitivity"] for t in result["tuned"] if math.isfinite(t["sensitivity"])}
        _close(pool, expected.scores, rel=1e-3)  # the scores the choice was made over (inf: no-mlp)
        assert result["choice"]["block"] == expected.pruned == Block(done.layer, done.kind).index
        assert done.sensitivity == pytest.approx(expected.tuned_score, rel=1e-3)
        seen["remembered winner"] += expected.pruned in expected.remembered
        seen["no-mlp in top"] += any(t["status"] == "no-mlp" for t in result["tuned"])
        seen["removed block in a window"] += any(request.mask.removed(Block.from_index(j)) for t in result["tuned"]
                                                 for j in range(t["block"] + 1, t["target"] + 1))
        # A request names the refits of MLPs removed since (a window runs them); the path does not.
        seen["refit of a removed MLP"] += any(layer in request.mask.mlp_removed for layer, _ in request.tuned)
        assert not any(layer in done.mask.mlp_removed for layer, _ in done.tuned)
    assert all(seen[what] for what in ("no-mlp in top", "removed block in a window")), seen
    if family == "llama":  # this path also chooses a remembered score and removes a refitted MLP
        assert seen["remembered winner"] and seen["refit of a removed MLP"], seen


def test_without_sprints_memory_the_path_forgets():
    """``memory: false`` (rayprune's earlier behaviour): no remembered score travels, all top
    candidates are refitted every step."""
    arch = tiny_arch("llama")
    windows = torch.randint(0, arch.vocab_size, (8, 24), generator=torch.Generator().manual_seed(1))
    _, steps = rayprune_path("llama", windows, BlockCosts(0.0, 2.0, 1.0), 3, memory=False)
    assert all(request.remembered == () for request, _ in steps)
    assert all(t["status"] != "remembered" for _, result in steps for t in result["tuned"])
    _, remembering = rayprune_path("llama", windows, BlockCosts(0.0, 2.0, 1.0), 3)
    assert any(request.remembered for request, _ in remembering)


# ---- SPRINT's speedup arithmetic (CompressionManager.get_latency / get_speedup) ---------------------------
def sprint_speedup(on: list[bool], latency: dict[str, float]) -> float:
    """dense latency / latency of the sublayers still on, each costing its type's latency."""

    def total(status: list[bool]) -> float:
        return sum(latency["MHA" if sid % 2 == 0 else "MLP"] for sid, kept in enumerate(status) if kept)

    return total([True] * len(on)) / total(on)


def test_speedup_is_sprints_arithmetic_on_a_latency_table():
    arch = tiny_arch("llama")
    table = LatencyTable("dev", "fp", {"prefill:1024": BlockCosts(0.30, 0.020, 0.050),
                                       "decode:1024": BlockCosts(0.004, 0.0002, 0.0004)},
                         {"prefill:1024": 0.58, "decode:1024": 0.0064})
    scenario = Scenario(**{"prompt": SprintConfig().latency_prompt, "generate": SprintConfig().latency_generate})
    assert (scenario.prompt, scenario.generate) == (1024, 512) == (Scenario().prompt, Scenario().generate)
    costs = table.scenario_costs(scenario)  # prefill + 512 decode steps
    assert costs.attn == pytest.approx(0.020 + 512 * 0.0002) and costs.mlp == pytest.approx(0.050 + 512 * 0.0004)
    latency = {"MHA": costs.attn, "MLP": costs.mlp}  # SPRINT's latency_dict
    searcher = SprintSearcher.from_search(SearchConfig(method="sprint", target_speedup=1.3), arch, costs)
    assert searcher.costs == BlockCosts(0.0, costs.attn, costs.mlp)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        on = (torch.rand(2 * arch.num_layers, generator=generator) > 0.4).tolist()
        if not any(on):
            continue
        mask = Mask(attn_removed={s // 2 for s, kept in enumerate(on) if not kept and s % 2 == 0},
                    mlp_removed={s // 2 for s, kept in enumerate(on) if not kept and s % 2 == 1})
        assert searcher.speedup(mask) == pytest.approx(sprint_speedup(on, latency), rel=1e-12)
        # With the fixed part counted (rayprune's earlier model) the same mask is estimated slower:
        # the same target speedup then removes more blocks.
        assert speedup(mask, arch, costs) <= searcher.speedup(mask)
    fixed = SprintSearcher.from_search(SearchConfig(method="sprint", target_speedup=1.3,
                                                    sprint=SprintConfig(latency_fixed=True)), arch, costs)
    assert fixed.costs == costs


def test_the_search_stops_where_sprints_loop_does():
    """SPRINT prunes ``while speedup < target_speedup``: the first removal that reaches it is the last.
    The searcher's own order (steps from the contract test's stand-in actor) replayed in that loop."""
    from tests.orchestrator.test_searcher_contract import score, sprint_step

    arch = tiny_arch("llama")
    latency = {"MHA": 1.0, "MLP": 2.0}
    for target in (1.1, 1.25, 1.6, 2.5):
        searcher = SprintSearcher(arch, BlockCosts(0.0, 1.0, 2.0), target_speedup=target, top_k=2)
        while (proposal := searcher.suggest()) is not None:
            request = proposal.request
            step = sprint_step(request) if request.top_k else None
            searcher.observe({m: score(m) for m in proposal.masks}, step=step)
        order = [Block(s.layer, s.kind).index for s in searcher.path]
        on, removed = [True] * 8, 0
        while sprint_speedup(on, latency) < target:
            on[order[removed]] = False
            removed += 1
        assert removed == len(order), target
        assert searcher.path[-1].speedup == pytest.approx(sprint_speedup(on, latency))


def test_a_replay_by_request_key_takes_the_same_path():
    """What a resumed campaign does (orchestrator/sprint_run.py): each step's result is looked up by
    its request's key. The memory and the refits of removed MLPs travel in the requests and are
    re-derived from the results, so a fresh searcher asks exactly the same requests."""
    arch = tiny_arch("llama")
    windows = torch.randint(0, arch.vocab_size, (8, 24), generator=torch.Generator().manual_seed(1))
    first, steps = rayprune_path("llama", windows, BlockCosts(0.0, 2.0, 1.0), 3)
    assert any(request.remembered for request, _ in steps)
    store = {request.key("model", "windows"): result for request, result in steps}
    again = SprintSearcher(arch, BlockCosts(0.0, 2.0, 1.0), max_steps=STEPS, top_k=3, ridge=RIDGE, checkpoint_every=1)
    while (proposal := again.suggest()) is not None:
        request = proposal.request
        step = store[request.key("model", "windows")] if request.top_k else None  # KeyError: another request
        again.observe({proposal.masks[0]: 1.0}, step=step)
    assert [(s.kind, s.layer, s.tuned) for s in again.path] == [(s.kind, s.layer, s.tuned) for s in first.path]
