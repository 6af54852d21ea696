"""Window shards: a mask's score split over tiles of windows is the same score, and fills the pool.

A score is a sum over windows (NLL sums and token counts add up), so the scorer cuts the windows of
a batch with few masks into shards at batch boundaries and adds each mask's shards up in float64.
Checked here: the tiling rule (no Ray), the sum of a real evaluator's shards against one whole call,
the same greedy path sharded and unsharded, all-or-nothing failure per mask, and on real Ray actors a
step with one candidate on two replicas that puts work on both.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import numpy as np
import pytest

from actors.evaluator import Evaluator
from orchestrator.cache import EvalCache
from orchestrator.dispatch import Dispatcher, Outcome, Task
from orchestrator.scorer import Scorer, combine_shards
from search_spaces.tiling import window_shards
from orchestrator.search import BlockPrunerSearcher
from search_spaces import Block, Mask
from tests.tiny import tiny_arch, tiny_campaign_config, tiny_run_setup

ARCH = tiny_arch("llama")
TOKENS = 23  # predicted tokens per window of 24


# ---- the tiling rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("n_windows", [1, 2, 3, 4, 7, 8, 64])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("n_actors", [1, 2, 3, 16])
@pytest.mark.parametrize("n_chunks", [1, 2, 3, 5, 32])
def test_shards_cover_the_windows_at_batch_boundaries_and_fill_the_pool(n_windows, batch_size, n_actors, n_chunks):
    shards = window_shards(n_windows, batch_size, n_chunks, n_actors)
    assert shards[0][0] == 0 and shards[-1][1] == n_windows
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))  # contiguous, in order
    assert all(start % batch_size == 0 for start, _ in shards)  # the engine's batches stay whole
    assert all(stop - start >= min(batch_size, n_windows - start) for start, stop in shards)  # >= one batch
    batches = -(-n_windows // batch_size)
    if n_actors == 1 or n_chunks >= 2 * n_actors:
        assert len(shards) == 1  # nothing to fill: today's tasks, unchanged
    else:
        assert n_chunks * len(shards) >= min(2 * n_actors, n_chunks * batches)  # two tiles per replica if possible


def test_one_mask_on_two_replicas_is_two_shards():
    assert window_shards(4, 2, 1, 2) == [(0, 2), (2, 4)]
    assert window_shards(7, 2, 1, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert window_shards(64, 4, 1, 16) == [(4 * i, 4 * i + 4) for i in range(16)]  # at most one per batch
    with pytest.raises(ValueError, match="batch size"):
        window_shards(4, 0, 1, 2)


def test_a_split_task_keeps_its_windows():
    task = Task("calibration", ["a", "b"], "base", rows=(2, 4), tokens=46)
    single = task.single("b")
    assert (single.masks, single.rows, single.tokens, single.base) == (["b"], (2, 4), 46, "base")


def test_shards_add_up_in_float64_in_any_order():
    parts = [((i, i + 1), {"nll_sum": 0.1 * (i + 1) + 1e-17 * i, "tokens": 23, "seconds": 0.5, "worker": f"w{i % 2}"},
              None) for i in range(10)]
    forward, backward = combine_shards(parts)[0], combine_shards(parts[::-1])[0]
    assert forward == backward  # exactly rounded: the arrival order changes no bit
    assert forward["nll_sum"] == math.fsum(p[1]["nll_sum"] for p in parts)
    assert forward["tokens"] == 230 and forward["seconds"] == 5.0 and forward["worker"] == "w0,w1"
    failed, error = combine_shards([parts[0], ((1, 2), None, "timed out")])
    assert failed is None and error == "windows 1-2: timed out"


# ---- the scorer on a fake pool (no Ray) -----------------------------------------------------------
def window_nll(mask: str, index: int) -> float:
    """A fake evaluator's NLL of ``mask`` on window ``index``: distinct, awkward floats."""
    return (len(mask) % 97 + 1) * math.pi + index * math.e / 7


class FakePool:
    """``actors`` replicas answering every task at once, last task first (any order must do); a mask
    and window range listed in ``fail`` fails for good."""

    def __init__(self, actors: int, windows: int, fail: frozenset[tuple[str, tuple[int, int] | None]] = frozenset()):
        self.actors, self.windows, self.fail = [f"actor{i}" for i in range(actors)], windows, fail
        self.tasks: list[Task] = []

    def run(self, tasks: Sequence[Task]):
        self.tasks += tasks
        for task in reversed(tasks):
            start, stop = task.rows or (0, self.windows)
            if any((m, task.rows) in self.fail for m in task.masks):
                yield Outcome(task, None, "evaluation raised: injected")
                continue
            yield Outcome(task, [{"nll_sum": math.fsum(window_nll(m, i) for i in range(start, stop)),
                                  "tokens": (stop - start) * TOKENS, "seconds": 0.01, "worker": str(task.rows)}
                                 for m in task.masks])


def fake_scorer(tmp_path, pool: FakePool, *, shapes: bool = True) -> Scorer:
    return Scorer(EvalCache(tmp_path / "evals", flush_every=None), pool, ARCH, "model", {"calibration": "w"},
                  window_shapes={"calibration": (pool.windows, TOKENS + 1)} if shapes else None, batch_size=2)


def test_one_candidate_on_two_replicas_makes_two_tiles_and_one_cache_row(tmp_path):
    pool = FakePool(2, windows=4)
    scorer = fake_scorer(tmp_path, pool)
    mask = Mask().remove(Block(1, "mlp"))
    ppl = scorer.score([mask], Mask(), "calibration", "step")[mask]
    assert [(t.masks, t.rows, t.tokens) for t in pool.tasks] == [([mask.to_json()], (0, 2), 2 * TOKENS),
                                                                 ([mask.to_json()], (2, 4), 2 * TOKENS)]
    [row] = scorer.cache.rows()  # one row per mask and window set, as before
    assert row["tokens"] == 4 * TOKENS and row["status"] == "ok" and row["worker"] == "(0, 2),(2, 4)"
    assert row["nll_sum"] == pytest.approx(math.fsum(window_nll(mask.to_json(), i) for i in range(4)), rel=1e-15)
    assert ppl == pytest.approx(math.exp(row["nll_sum"] / row["tokens"]), rel=1e-12)
    assert scorer.counters.evaluated == 1


def test_many_masks_are_not_sharded(tmp_path):
    pool = FakePool(2, windows=4)
    masks = [Mask().remove(Block.from_index(i)) for i in range(6)]
    fake_scorer(tmp_path, pool).score(masks, Mask(), "calibration", "step")
    assert len(pool.tasks) == 4 and {t.rows for t in pool.tasks} == {None}  # 2 chunks per actor, as before
    assert {t.tokens for t in pool.tasks} == {4 * TOKENS}  # but the dispatcher knows their work


def test_a_failed_shard_fails_its_mask_and_only_its_mask(tmp_path):
    masks = [Mask().remove(Block(layer, "attn")) for layer in range(2)]
    pool = FakePool(2, windows=8, fail=frozenset({(masks[0].to_json(), (4, 8))}))
    scorer = fake_scorer(tmp_path, pool)
    scores = scorer.score(masks, Mask(), "calibration", "step")
    assert {t.rows for t in pool.tasks} == {(0, 4), (4, 8)}
    assert math.isnan(scores[masks[0]]) and not math.isnan(scores[masks[1]])
    assert scorer.counters.failed == 1 and scorer.counters.evaluated == 1
    failed = scorer.cache.get_failed(scorer.key(masks[0], "calibration"))
    assert failed is not None and "windows 4-8" in failed["error"] and len(scorer.cache.rows()) == 1


def test_sharded_and_unsharded_scores_agree_on_a_fake_pool(tmp_path):
    masks = [Mask().remove(Block.from_index(i)) for i in range(3)]
    sharded = fake_scorer(tmp_path / "a", FakePool(8, windows=8)).score(masks, Mask(), "calibration", "s")
    whole_pool = FakePool(8, windows=8)
    whole = fake_scorer(tmp_path / "b", whole_pool, shapes=False).score(masks, Mask(), "calibration", "s")
    assert {t.rows for t in whole_pool.tasks} == {None}
    assert sharded.keys() == whole.keys()
    assert all(sharded[m] == pytest.approx(whole[m], rel=1e-12) for m in masks)


# ---- a real evaluator (in this process) -----------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def evaluator(setup):
    windows = np.random.default_rng(0).integers(0, 97, size=(8, 24))
    return Evaluator(setup["model"], {"calibration": windows}, batch_size=2)


class InProcess:
    """The dispatcher's ``run`` on one in-process Evaluator posing as ``actors`` replicas; tiles are
    answered in reverse order (a pool answers in any order)."""

    def __init__(self, evaluator: Evaluator, actors: int) -> None:
        self.evaluator, self.actors, self.tasks = evaluator, [evaluator] * actors, []

    def run(self, tasks: Sequence[Task]):
        self.tasks += tasks
        for task in reversed(tasks):
            yield Outcome(task, self.evaluator.evaluate(task.window_set, task.masks, task.base, task.rows))


def test_a_real_evaluators_shards_add_up_to_the_whole(evaluator):
    masks = [Mask().to_json(), Mask().remove(Block(0, "attn")).to_json(), Mask().remove(Block(3, "mlp")).to_json()]
    base = Mask().to_json()
    whole = evaluator.evaluate("calibration", masks, base)
    for shards in ([(0, 4), (4, 8)], [(0, 2), (2, 4), (4, 6), (6, 8)], [(0, 6), (6, 8)]):
        parts = [evaluator.evaluate("calibration", masks, base, rows) for rows in shards]
        for i, row in enumerate(whole):
            combined, error = combine_shards([(rows, part[i], None) for rows, part in zip(shards, parts)])
            assert error is None and combined["tokens"] == row["tokens"] == 8 * TOKENS
            assert abs(combined["nll_sum"] - row["nll_sum"]) <= 1e-9 * abs(row["nll_sum"])
    with pytest.raises(ValueError, match="not a window range"):
        evaluator.evaluate("calibration", masks, base, (6, 9))


def greedy(scorer: Scorer) -> BlockPrunerSearcher:
    searcher = BlockPrunerSearcher(ARCH, 0.5, max_steps=3)
    while (proposal := searcher.suggest()) is not None:
        searcher.observe(scorer.score(proposal.masks, proposal.base, "calibration", proposal.label))
    return searcher


def test_sharded_greedy_takes_the_same_path_with_the_same_scores(tmp_path, evaluator):
    caches = {name: EvalCache(tmp_path / name, flush_every=None) for name in ("sharded", "whole")}
    eight = InProcess(evaluator, 8)  # 8 replicas: every step has fewer chunks than 2 per replica
    sharded = greedy(Scorer(caches["sharded"], eight, ARCH, "model", {"calibration": "w"},
                            window_shapes={"calibration": (8, 24)}, batch_size=2))
    one = InProcess(evaluator, 1)
    whole = greedy(Scorer(caches["whole"], one, ARCH, "model", {"calibration": "w"},
                          window_shapes={"calibration": (8, 24)}, batch_size=2))
    assert {t.rows for t in one.tasks} == {None}
    # 9, 7, 6 masks on 8 replicas: 2, 3, 3 shards, cut at the batches of 2 windows
    assert {t.rows for t in eight.tasks} == {(0, 4), (4, 8), (0, 2), (2, 4)}
    assert [(s.kind, s.layer) for s in sharded.path] == [(s.kind, s.layer) for s in whole.path]
    assert len(sharded.path) == 3
    for a, b in zip([sharded.dense_ppl, *(s.ppl for s in sharded.path)], [whole.dense_ppl, *(s.ppl for s in whole.path)]):
        assert a == pytest.approx(b, rel=1e-9)
    # Every mask's summed NLL within 1e-9 relative, the same token counts, one row per mask in both caches.
    rows = {name: {r["key"]: r for r in scorer_cache.rows()} for name, scorer_cache in caches.items()}
    assert rows["sharded"].keys() == rows["whole"].keys() and len(rows["whole"]) == 1 + 8 + 7 + 6
    worst = max(abs(r["nll_sum"] - rows["whole"][k]["nll_sum"]) / abs(rows["whole"][k]["nll_sum"])
                for k, r in rows["sharded"].items())
    assert worst <= 1e-9, worst
    assert all(r["tokens"] == rows["whole"][k]["tokens"] == 8 * TOKENS for k, r in rows["sharded"].items())
    print(f"\nsharded vs whole: {len(rows['whole'])} masks, largest relative NLL difference {worst:.3g}")


# ---- real Ray actors --------------------------------------------------------------------------------
class LoggingEvaluator(Evaluator):
    """Appends ``pid rows masks`` per ``evaluate`` call to ``<log_dir>/calls.log`` (across actors);
    each call takes at least ``delay_s``, as a real model's would (a tiny model's is over before the
    other replica has said it is ready)."""

    log_dir: str = ""
    delay_s: float = 0.5

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        with open(os.path.join(self.log_dir, "calls.log"), "a") as handle:
            handle.write(f"{os.getpid()} {None if rows is None else tuple(rows)} {len(masks)}\n")
        time.sleep(self.delay_s)
        return super().evaluate(window_set, masks, base, rows)


@pytest.mark.ray
def test_one_candidate_on_two_replicas_keeps_both_busy(ray_session, setup, tmp_path):
    from cluster.session import evaluator_pool
    from orchestrator.campaign import Campaign
    from orchestrator.data.windows import windows_fingerprint

    campaign = Campaign(tiny_campaign_config(setup, "two-replicas", **{"search.target_ratio": 0.5,
                                                                         "search.batch_size": 2}), progress=False)
    arch, windows = campaign.prepare()  # 4 x 24 calibration windows, 2 per batch
    cls = type("ConfiguredLoggingEvaluator", (LoggingEvaluator,), {"log_dir": str(tmp_path)})
    with evaluator_pool(campaign.config.cluster, evaluator_cls=cls, model=campaign.config.model, windows=windows,
                        batch_size=2, dtype="float32") as pool:
        scorer = Scorer(EvalCache(tmp_path / "evals", flush_every=None), Dispatcher(pool.actors, timeout_s=60), arch,
                        pool.model_fingerprint, {n: windows_fingerprint(w) for n, w in windows.items()},
                        window_shapes={n: w.shape for n, w in windows.items()}, batch_size=2)
        candidate = Mask().remove(Block(2, "attn"))
        scorer.score([candidate], Mask(), "calibration", "one candidate")
        pids = {info["pid"] for info in ray_session.get([a.info.remote() for a in pool.actors])}
    calls = [line.split(" ", 1) for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert {int(pid) for pid, _ in calls} == pids and len(pids) == 2  # both replicas worked
    assert sorted(rest for _, rest in calls) == ["(0, 2) 1", "(2, 4) 1"]
    [row] = scorer.cache.rows()
    assert row["tokens"] == 4 * TOKENS and sorted(int(w.split(":")[-1]) for w in row["worker"].split(",")) == sorted(pids)
