"""Dispatching evaluation tasks over a pool of evaluator actors.

The dispatcher owns ordering and retries; actors own nothing. Every actor gets a task as soon as it
is free (no idle actor while work is queued). A task whose actor died (Ray restarts the actor and
its model) or hung past its timeout (the actor is killed and restarted) is resubmitted; a task that
raised is split into single masks so one bad mask cannot sink its neighbours; a mask is given up
after ``max_attempts`` and reported as failed, and the search goes on.

An actor that Ray is restarting gets no work until it answers again (its ``__ray_ready__``), so no
task is charged an attempt, or timed, for another task's crash; an actor that Ray reports dead for
good leaves the pool, and the dispatcher raises only when no actor is left.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)


@dataclass
class Task:
    """Masks (canonical JSON) to score on one window set, branching from ``base``."""

    window_set: str
    masks: list[str]
    base: str | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    timeout_s: float | None = None  # None: the dispatcher's timeout per mask

    def submit(self, actor: Any) -> Any:
        return actor.evaluate.remote(self.window_set, self.masks, self.base)

    def single(self, mask: str) -> Task:
        return Task(self.window_set, [mask], self.base, self.attempts, list(self.errors), self.timeout_s)


@dataclass
class Call(Task):
    """One call of any other evaluator method (``sprint_step``, ``latency_table``): its result is
    the outcome's ``rows``; it is retried like a task, never split."""

    method: str = ""
    args: tuple[Any, ...] = ()

    def submit(self, actor: Any) -> Any:
        return getattr(actor, self.method).remote(*self.args)


@dataclass(frozen=True)
class Outcome:
    """The result of a task: one row per mask (a :class:`Call`: its result), or the error that
    made it fail for good."""

    task: Task
    rows: Any
    error: str | None = None


class Dispatcher:
    def __init__(self, actors: Sequence[Any], *, timeout_s: float = 600.0, max_attempts: int = 3,
                 poll_s: float = 1.0) -> None:
        if not actors:
            raise ValueError("the dispatcher needs at least one actor")
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.resubmissions = 0
        self._restarting: dict[Any, Any] = {}  # readiness probe -> actor that Ray is restarting

    def _timeout(self, task: Task) -> float:
        return task.timeout_s or self.timeout_s * max(1, len(task.masks))

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        """``method(*args)`` on the first free evaluator (the same one while it lives, so its memo
        helps), with the retries of :meth:`run`; RuntimeError once every attempt failed."""
        outcome = next(iter(self.run([Call("", [], timeout_s=timeout_s, method=method, args=args)])))
        if outcome.error is not None:
            raise RuntimeError(f"{method} failed {self.max_attempts} times ({outcome.error}); the evaluators' Ray "
                               f"logs say why; raise cluster.max_attempts or cluster.eval_timeout_s")
        return outcome.rows

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        """Yield an ``Outcome`` per task (or per mask of a split task) as they complete."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        queue: deque[Task] = deque(tasks)
        restarting = {id(actor) for actor in self._restarting.values()}
        idle = [actor for actor in self.actors if id(actor) not in restarting]
        in_flight: dict[Any, tuple[Any, Task, float]] = {}
        while queue or in_flight:
            while queue and idle:
                actor, task = idle.pop(0), queue.popleft()
                ref = task.submit(actor)
                in_flight[ref] = (actor, task, time.monotonic())
            if not (in_flight or self._restarting):
                raise RuntimeError(f"every evaluator died for good; {len(queue)} task(s) left undone. The Ray "
                                   f"logs of the evaluator processes say why (e.g. its model no longer loads)")
            ready, _ = ray.wait([*in_flight, *self._restarting], num_returns=1, timeout=self.poll_s)
            for ref in ready:
                if ref in self._restarting:
                    idle.extend(self._restarted(ref))
                    continue
                actor, task, _ = in_flight.pop(ref)
                try:
                    rows = ray.get(ref)
                except (RayActorError, GetTimeoutError) as exc:  # the process died: Ray restarts it
                    self._await_restart(actor)
                    yield from self._retry(queue, task, f"evaluator died: {type(exc).__name__}")
                    continue
                except RayTaskError as exc:  # evaluate() raised
                    idle.append(actor)
                    yield from self._retry(queue, task, f"evaluation raised: {exc.cause!r}", split=True)
                    continue
                idle.append(actor)
                yield Outcome(task, rows)
            now = time.monotonic()
            for ref, (actor, task, started) in list(in_flight.items()):
                if now - started > self._timeout(task):
                    log.warning("evaluation of %d masks exceeded %.0f s: restarting its actor",
                                len(task.masks), self._timeout(task))
                    del in_flight[ref]
                    ray.kill(actor, no_restart=False)
                    self._await_restart(actor)
                    yield from self._retry(queue, task, "timed out")

    def _await_restart(self, actor: Any) -> None:
        """Keep ``actor`` out of work until Ray has restarted it (its model loaded again)."""
        self._restarting[actor.__ray_ready__.remote()] = actor

    def _restarted(self, probe: Any) -> list[Any]:
        """``[actor]`` once its readiness probe answered; ``[]`` while it restarts or if it is gone."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError

        actor = self._restarting.pop(probe)
        try:
            ray.get(probe)
        except ActorDiedError as exc:  # no restart left, or its __init__ raised: it leaves the pool
            log.error("an evaluator died for good and leaves the pool (%d left): %s", len(self.actors) - 1, exc)
            self.actors = [a for a in self.actors if a is not actor]
            return []
        except RayActorError:  # ActorUnavailableError: still restarting, ask again
            self._await_restart(actor)
            return []
        return [actor]

    def _retry(self, queue: deque[Task], task: Task, error: str, *, split: bool = False) -> Iterator[Outcome]:
        task.attempts += 1
        task.errors.append(error)
        if split and len(task.masks) > 1:  # isolate the mask that raises
            queue.extend(task.single(m) for m in task.masks)
        elif task.attempts < self.max_attempts:
            self.resubmissions += 1
            queue.append(task)
        else:
            yield Outcome(task, None, "; ".join(task.errors))


def balanced_chunks(costs: Sequence[float], n_chunks: int) -> list[list[int]]:
    """Split items (kept in order) into at most ``n_chunks`` contiguous runs of similar total cost."""
    if not costs:  # nothing to do: no chunk at all (an empty task would still occupy an actor)
        return []
    n_chunks = max(1, min(n_chunks, len(costs)))
    target = sum(costs) / n_chunks
    chunks: list[list[int]] = [[]]
    acc = 0.0
    for i, cost in enumerate(costs):
        remaining_items, remaining_chunks = len(costs) - i, n_chunks - len(chunks)
        if chunks[-1] and (acc + cost / 2 > target or remaining_items <= remaining_chunks) and remaining_chunks > 0:
            chunks.append([])
            acc = 0.0
        chunks[-1].append(i)
        acc += cost
    return chunks
