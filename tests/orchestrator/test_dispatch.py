"""The dispatcher on real Ray actors: load spreading, retries, isolation of a bad mask."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.dispatch import Dispatcher, Task, balanced_chunks

pytestmark = pytest.mark.ray


class FakeEvaluator:
    """Scores a mask as its length; a mask containing 'raise' raises, 'die' kills the process once
    (per marker file), 'sleep' sleeps (also once). A restart after 'die' is slow, like reloading a model."""

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

    def evaluate(self, window_set, masks, base=None):
        rows = []
        for mask in masks:
            if "raise" in mask:
                raise ValueError(f"bad mask {mask}")
            if "die" in mask and self._once("died"):
                os._exit(1)
            if "sleep" in mask and self._once("slept"):
                time.sleep(60)
            time.sleep(0.05)
            rows.append({"nll_sum": float(len(mask)), "tokens": 1, "seconds": 0.0, "worker": str(os.getpid())})
        return rows


@pytest.fixture
def actors(ray_session, tmp_path):
    cls = ray_session.remote(FakeEvaluator).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
    handles = [cls.remote(str(tmp_path)) for _ in range(2)]
    ray_session.get([h.pid.remote() for h in handles])
    return handles


def _run(dispatcher, tasks):
    return {tuple(o.task.masks): o for o in dispatcher.run(tasks)}


def test_every_task_runs_once_and_both_actors_work(actors):
    tasks = [Task("calibration", [f"m{i}", f"m{i}x"]) for i in range(10)]
    outcomes = _run(Dispatcher(actors, timeout_s=30), tasks)
    assert len(outcomes) == 10
    assert all(o.rows and [r["nll_sum"] for r in o.rows] == [len(m) for m in o.task.masks] for o in outcomes.values())
    assert len({r["worker"] for o in outcomes.values() for r in o.rows}) == 2


def test_raising_mask_is_isolated_and_given_up(actors):
    tasks = [Task("calibration", ["ok1", "raise-me", "ok2"]), Task("calibration", ["ok3"])]
    dispatcher = Dispatcher(actors, timeout_s=30, max_attempts=2)
    outcomes = list(dispatcher.run(tasks))
    failed = [o for o in outcomes if o.rows is None]
    assert [o.task.masks for o in failed] == [["raise-me"]]
    assert "bad mask raise-me" in failed[0].error
    done = sorted(m for o in outcomes if o.rows for m in o.task.masks)
    assert done == ["ok1", "ok2", "ok3"]


def test_dead_actor_is_restarted_and_its_task_rerouted(actors):
    tasks = [Task("calibration", [f"a{i}"]) for i in range(4)] + [Task("calibration", ["die"])]
    outcomes = _run(Dispatcher(actors, timeout_s=60), tasks)
    assert all(o.rows for o in outcomes.values())
    assert outcomes[("die",)].task.attempts == 1


def test_no_task_is_charged_for_an_actor_that_is_restarting(actors):
    innocent = [Task("calibration", [f"i{i}"]) for i in range(60)]  # ~3 s of work: the restart happens meanwhile
    dispatcher = Dispatcher(actors, timeout_s=60, max_attempts=2)
    outcomes = _run(dispatcher, [Task("calibration", ["die"]), *innocent])
    assert all(o.rows for o in outcomes.values())
    assert dispatcher.resubmissions == 1 and [t.attempts for t in innocent] == [0] * 60


def test_an_actor_dead_for_good_leaves_the_pool(ray_session, actors):
    ray_session.kill(actors[0], no_restart=True)
    dispatcher = Dispatcher(actors, timeout_s=60)
    outcomes = _run(dispatcher, [Task("calibration", [f"m{i}"]) for i in range(6)])
    assert all(o.rows for o in outcomes.values()) and len(outcomes) == 6
    assert dispatcher.actors == [actors[1]]

    ray_session.kill(actors[1], no_restart=True)
    with pytest.raises(RuntimeError, match="every evaluator died for good"):
        _run(dispatcher, [Task("calibration", ["m"])])


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
