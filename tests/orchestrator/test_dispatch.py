"""The dispatcher on real Ray actors: load spreading, retries, isolation of a bad mask, hang limits."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.dispatch import Call, Dispatcher, HangLimit, Task
from search_spaces.tiling import balanced_chunks


class FakeEvaluator:
    """Scores a mask as its length; a mask containing 'raise' raises, 'die' kills the process once
    (per marker file), 'sleep' sleeps (also once), 'tokN' is N tokens of work (0.05 s each; any other
    mask: 1). A restart after 'die' is slow, like reloading a model."""

    def __init__(self, marker_dir: str) -> None:
        self.marker_dir = marker_dir
        if os.path.exists(os.path.join(marker_dir, "died")):
            time.sleep(3)

    def pid(self) -> int:
        return os.getpid()

    def _once(self, what: str) -> bool:
        marker = os.path.join(self.marker_dir, what)
        if os.path.exists(marker):
            return False
        open(marker, "w").close()
        return True

    def evaluate(self, window_set, masks, base=None, rows=None):
        out = []
        for mask in masks:
            if "raise" in mask:
                raise ValueError(f"bad mask {mask}")
            if "die" in mask and self._once("died"):
                os._exit(1)
            if "sleep" in mask and self._once("slept"):
                time.sleep(60)
            tokens = int(mask[3:]) if mask.startswith("tok") else 1
            time.sleep(0.05 * tokens)
            out.append({"nll_sum": float(len(mask)), "tokens": tokens, "seconds": 0.0, "worker": str(os.getpid())})
        return out


@pytest.fixture
def actors(ray_session, tmp_path):
    cls = ray_session.remote(FakeEvaluator).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
    handles = [cls.remote(str(tmp_path)) for _ in range(2)]
    ray_session.get([h.pid.remote() for h in handles])
    return handles


def _run(dispatcher, tasks):
    return {tuple(o.task.masks): o for o in dispatcher.run(tasks)}


@pytest.mark.ray
def test_every_task_runs_once_and_both_actors_work(actors):
    tasks = [Task("calibration", [f"m{i}", f"m{i}x"]) for i in range(10)]
    outcomes = _run(Dispatcher(actors, timeout_s=30), tasks)
    assert len(outcomes) == 10
    assert all(o.rows and [r["nll_sum"] for r in o.rows] == [len(m) for m in o.task.masks] for o in outcomes.values())
    assert len({r["worker"] for o in outcomes.values() for r in o.rows}) == 2


@pytest.mark.ray
def test_raising_mask_is_isolated_and_given_up(actors):
    tasks = [Task("calibration", ["ok1", "raise-me", "ok2"]), Task("calibration", ["ok3"])]
    dispatcher = Dispatcher(actors, timeout_s=30, max_attempts=2)
    outcomes = list(dispatcher.run(tasks))
    failed = [o for o in outcomes if o.rows is None]
    assert [o.task.masks for o in failed] == [["raise-me"]]
    assert "bad mask raise-me" in failed[0].error
    done = sorted(m for o in outcomes if o.rows for m in o.task.masks)
    assert done == ["ok1", "ok2", "ok3"]


@pytest.mark.ray
def test_dead_actor_is_restarted_and_its_task_rerouted(actors):
    tasks = [Task("calibration", [f"a{i}"]) for i in range(4)] + [Task("calibration", ["die"])]
    outcomes = _run(Dispatcher(actors, timeout_s=60), tasks)
    assert all(o.rows for o in outcomes.values())
    assert outcomes[("die",)].task.attempts == 1


@pytest.mark.ray
def test_no_task_is_charged_for_an_actor_that_is_restarting(actors):
    innocent = [Task("calibration", [f"i{i}"]) for i in range(60)]  # ~3 s of work: the restart happens meanwhile
    dispatcher = Dispatcher(actors, timeout_s=60, max_attempts=2)
    outcomes = _run(dispatcher, [Task("calibration", ["die"]), *innocent])
    assert all(o.rows for o in outcomes.values())
    assert dispatcher.resubmissions == 1 and [t.attempts for t in innocent] == [0] * 60


@pytest.mark.ray
def test_an_actor_dead_for_good_leaves_the_pool(ray_session, actors):
    ray_session.kill(actors[0], no_restart=True)
    dispatcher = Dispatcher(actors, timeout_s=60)
    outcomes = _run(dispatcher, [Task("calibration", [f"m{i}"]) for i in range(6)])
    assert all(o.rows for o in outcomes.values()) and len(outcomes) == 6
    assert dispatcher.actors == [actors[1]]

    ray_session.kill(actors[1], no_restart=True)
    with pytest.raises(RuntimeError, match="every evaluator died for good"):
        _run(dispatcher, [Task("calibration", ["m"])])


@pytest.mark.ray
def test_hung_actor_times_out_and_the_task_is_retried(actors):
    dispatcher = Dispatcher(actors, timeout_s=3, poll_s=0.2)
    outcomes = _run(dispatcher, [Task("calibration", ["sleep"]), Task("calibration", ["b"])])
    assert outcomes[("sleep",)].rows and outcomes[("sleep",)].task.errors == ["timed out"]


def test_balanced_chunks_cover_everything_in_order():
    costs = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    chunks = balanced_chunks(costs, 4)
    assert [i for c in chunks for i in c] == list(range(10))
    assert len(chunks) == 4
    totals = [sum(costs[i] for i in c) for c in chunks]
    assert max(totals) <= 2 * (sum(costs) / 4)
    assert balanced_chunks([1.0], 8) == [[0]]


# ---- hang limits proportional to work ---------------------------------------------------------------
def finished(hang: HangLimit, tokens: int, seconds: float, masks: int = 1) -> None:
    """Tell ``hang`` that a task of ``masks`` masks x ``tokens`` tokens took ``seconds``."""
    hang.observe(Task("calibration", ["m"] * masks, tokens=tokens), [{"tokens": tokens}] * masks, seconds)


def test_the_configured_limit_holds_until_work_was_measured():
    hang = HangLimit(600.0)
    task = Task("calibration", ["a", "b", "c"], tokens=262_144)
    assert hang.limit(task) == 1800.0  # per mask, as before
    assert hang.limit(Call("", [], method="sprint_step")) == 600.0
    assert hang.limit(Call("", [], timeout_s=42.0, method="sprint_step")) == 42.0  # a caller's own limit stays
    hang.observe(Call("", [], method="latency_table"), {"table": 1}, 5.0)  # calls are never measured
    assert hang.limit(task) == 1800.0 and not hang.rates


def test_the_limit_grows_with_measured_work_and_a_hung_task_is_still_killed():
    hang = HangLimit(600.0)
    finished(hang, tokens=262_144, seconds=1000.0)  # one 70B mask on 262k tokens: past the old 600 s
    per_token = 1000.0 / 262_144
    one, four = Task("calibration", ["a"], tokens=262_144), Task("calibration", list("abcd"), tokens=262_144)
    assert hang.limit(one) == pytest.approx(10 * 1000.0)  # 10 x the measured work, not 600 s
    assert hang.limit(four) == pytest.approx(4 * hang.limit(one))
    shard = Task("calibration", ["a"], rows=(0, 4), tokens=4 * 4095)
    assert hang.limit(shard) == pytest.approx(10 * per_token * 4 * 4095)  # a small shard: a small limit ...
    assert hang.limit(Task("calibration", ["a"], tokens=100)) == 60.0  # ... never under the floor
    # The median, not the mean: one straggler does not move it; a faster pool lowers it.
    finished(hang, tokens=262_144, seconds=10 * 1000.0)
    finished(hang, tokens=262_144, seconds=900.0)
    assert hang.limit(one) == pytest.approx(10 * 1000.0)
    # A hung task is still killed: its limit is finite, proportional to what it should take.
    assert hang.limit(one) < 3 * 3600


def test_a_small_configured_limit_is_also_the_floor():
    hang = HangLimit(2.0)  # e.g. tests: the floor is what the configured value allows the task, if under 60 s
    finished(hang, tokens=10, seconds=0.01)
    assert hang.limit(Task("calibration", ["a"], tokens=10)) == 2.0
    assert hang.limit(Task("calibration", ["a", "b"], tokens=10)) == 4.0
    assert hang.limit(Task("calibration", ["a"], tokens=1000)) == pytest.approx(10 * 0.001 * 1000)
    assert hang.limit(Task("calibration", ["a"], tokens=100_000)) == pytest.approx(10 * 0.001 * 100_000)


def test_tokens_are_learned_per_window_range_when_a_task_does_not_say():
    hang = HangLimit(5.0)
    hang.observe(Task("evaluation", ["a", "b"], rows=(0, 2)), [{"tokens": 510}, {"tokens": 510}], 1.02)
    assert hang.tokens(Task("evaluation", ["c"], rows=(0, 2))) == 510
    assert hang.tokens(Task("evaluation", ["c"], rows=(2, 4))) is None  # other windows: not known
    assert hang.limit(Task("evaluation", ["c"], rows=(2, 4))) == 5.0  # configured until known
    assert hang.limit(Task("evaluation", ["c"] * 100, rows=(0, 2))) == pytest.approx(10 * 0.001 * 100 * 510)


@pytest.mark.ray
def test_measured_work_lets_a_long_task_finish_and_a_hang_is_still_killed(actors):
    dispatcher = Dispatcher(actors, timeout_s=1, poll_s=0.1)  # 1 s per mask until something was measured
    assert all(o.rows for o in dispatcher.run([Task("calibration", [f"w{i}"], tokens=1) for i in range(6)]))
    long = Task("calibration", ["tok40"], tokens=40)  # 2 s: twice the configured limit
    assert dispatcher.hang.limit(long) >= 10 * 0.05 * 40
    t0 = time.monotonic()
    outcomes = _run(dispatcher, [long, Task("calibration", ["sleep"], tokens=1)])
    assert outcomes[("tok40",)].rows and long.errors == []  # not killed: its limit follows its work
    assert outcomes[("sleep",)].rows and outcomes[("sleep",)].task.errors == ["timed out"]  # hung: killed, retried
    assert time.monotonic() - t0 < 20  # the hang was killed near its (floor) limit, not after 60 s


@pytest.mark.ray
def test_loading_a_model_is_never_timed(ray_session, tmp_path):
    open(tmp_path / "died", "w").close()  # every FakeEvaluator now takes 3 s to load
    cls = ray_session.remote(FakeEvaluator).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
    fresh = [cls.remote(str(tmp_path)) for _ in range(2)]  # not waited for: still loading
    dispatcher = Dispatcher(fresh, timeout_s=1, poll_s=0.1)
    outcomes = _run(dispatcher, [Task("calibration", [f"m{i}"]) for i in range(4)])
    assert all(o.rows and o.task.errors == [] for o in outcomes.values())
    assert dispatcher.resubmissions == 0


def test_a_task_goes_to_the_actor_it_prefers_when_that_one_is_free(actors, ray_session):
    pids = ray_session.get([a.pid.remote() for a in actors])
    dispatcher = Dispatcher(actors, timeout_s=30)
    list(dispatcher.run([Call("", [], method="pid")]))
    while dispatcher.loading:  # until both have answered their readiness probe (a loaded actor answers at once)
        list(dispatcher.run([Call("", [], method="pid")]))
    for round_ in range(2):  # whatever order the actors became free in, each shard returns to its actor
        tasks = [Call("", [], method="pid", prefer=i) for i in (1, 0)]
        assert {t.prefer: o.rows for o in dispatcher.run(tasks) for t in [o.task]} == {0: pids[0], 1: pids[1]}
    # A free actor never waits for work that prefers a busy one: both tasks preferring actor 0 run.
    outcomes = list(dispatcher.run([Call("", [], method="pid", prefer=0) for _ in range(2)]))
    assert sorted(o.rows for o in outcomes) == sorted(pids)
