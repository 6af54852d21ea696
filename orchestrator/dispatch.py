"""Dispatching evaluation tasks over a pool of evaluator actors.

The dispatcher owns ordering and retries; actors own nothing. Every actor gets a task as soon as it
is free (no idle actor while work is queued). A task is a tile: masks on a window range of one set
(``rows``; the scorer splits windows into shards so that a step with few masks still fills every
replica). A task whose actor died (Ray restarts the actor and its model) or hung past its limit (the
actor is killed and restarted) is resubmitted; a task that raised is split into single masks (on the
same windows) so one bad mask cannot sink its neighbours; a mask is given up after ``max_attempts``
and reported as failed, and the search goes on.

A task may name the actor it prefers (``prefer``: the phases of a sharded SPRINT step go back to
the replica that holds their shard's streams); a free actor takes the first task that prefers it,
else the first in the queue, so no actor idles while work is queued.

Replicas may join while it runs (``joiner``: an autoscaler booting their nodes); each takes work the
moment it has loaded, and later steps cut their tiles for the larger pool.

An actor gets its first task, and its first after a restart, only once it answers
(``__ray_ready__``), so loading a model is never timed, no task is charged an attempt for another
task's crash, and an actor that Ray reports dead for good leaves the pool; the dispatcher raises only
when no actor is left.

The hang limit is proportional to work (:class:`HangLimit`): a task's work is its masks x the tokens
each is scored on; once tasks have finished, a task is hung after ``slack`` (10) x the median seconds
per mask-token of the finished tasks x its work, and never before the floor: 60 s, or what the
configured ``timeout_s`` per mask allows the task if that is less. Before anything was measured, the
configured ``timeout_s`` per mask (``cluster.eval_timeout_s``) is the limit. A task's limit is fixed
when it starts; a task with its own ``timeout_s`` (a :class:`Call`) keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)


@dataclass
class Task:
    """Masks (canonical JSON) to score on one window set, branching from ``base``; ``rows``: the
    windows ``[start, stop)`` of the set (a shard; None: all), ``tokens``: the tokens each mask is
    scored on there (None: learned from the first result on the same windows)."""

    window_set: str
    masks: list[str]
    base: str | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    timeout_s: float | None = None  # None: the dispatcher's hang limit (HangLimit)
    rows: tuple[int, int] | None = None
    tokens: int | None = None
    prefer: int | None = None  # the actor (its index in the pool) that should take it when free: its memo helps
    fitness: str = "ppl"  # search_spaces.scores.fitness_tag: ppl, kl, kl:<K>

    def submit(self, actor: Any) -> Any:
        if self.fitness != "ppl":
            return actor.evaluate.remote(self.window_set, self.masks, self.base, self.rows, self.fitness)
        if self.rows is None:  # the call every evaluator (and every subclass in tests) understands
            return actor.evaluate.remote(self.window_set, self.masks, self.base)
        return actor.evaluate.remote(self.window_set, self.masks, self.base, self.rows)

    def single(self, mask: str) -> Task:
        return dataclasses.replace(self, masks=[mask], errors=list(self.errors))


@dataclass
class Call(Task):
    """One call of any other evaluator method (``sprint_step``, ``latency_table``): its result is
    the outcome's ``rows``; it is retried like a task, never split, never measured."""

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


class HangLimit:
    """How long a task may run before it counts as hung: proportional to its work once work was
    measured, the configured seconds per mask before that (see the module's docstring).

    ``observe`` takes the wall seconds of every finished task (from its start on an actor that had
    answered, so loading a model never counts); the median of the last ``window`` rates follows a
    pool whose speed changes (masks get cheaper as the model shrinks) without one straggler moving it.
    """

    def __init__(self, per_mask_s: float, *, slack: float = 10.0, floor_s: float = 60.0, window: int = 256) -> None:
        self.per_mask_s = per_mask_s
        self.slack = slack
        self.floor_s = floor_s
        self.rates: deque[float] = deque(maxlen=window)  # seconds per mask-token of finished tasks
        self._tokens: dict[tuple[str, tuple[int, int] | None], int] = {}  # tokens per mask, by windows

    def tokens(self, task: Task) -> int | None:
        """Tokens each mask of ``task`` is scored on: its own figure, else the one seen on its windows."""
        return task.tokens or self._tokens.get((task.window_set, task.rows))

    def limit(self, task: Task) -> float:
        """Seconds ``task`` may run from now."""
        if task.timeout_s:
            return task.timeout_s
        masks = max(1, len(task.masks))
        configured = self.per_mask_s * masks
        tokens = self.tokens(task)
        if isinstance(task, Call) or not self.rates or not tokens:
            return configured
        # The floor: a configured limit below it is meant (it keeps hang tests quick), so it is the lower one.
        return max(min(self.floor_s, configured), self.slack * statistics.median(self.rates) * masks * tokens)

    def describe(self, task: Task) -> str:
        """Where ``task``'s limit comes from, for the log line that reports a kill."""
        if task.timeout_s:
            return "the caller's own limit"
        if isinstance(task, Call) or not self.rates or not self.tokens(task):
            return "the configured limit: cluster.eval_timeout_s per mask, nothing measured yet"
        return (f"{self.slack:g} x the measured {statistics.median(self.rates):.3g} s per mask-token x "
                f"{len(task.masks)} masks x {self.tokens(task)} tokens, at least "
                f"{min(self.floor_s, self.per_mask_s * max(1, len(task.masks))):g} s")

    def observe(self, task: Task, rows: Any, seconds: float) -> None:
        """Record a finished task: ``rows`` as ``evaluate`` returns them, ``seconds`` of wall time."""
        if isinstance(task, Call) or not rows:
            return
        tokens = sum(int(row.get("tokens") or 0) for row in rows)
        if tokens <= 0:
            return
        self._tokens[(task.window_set, task.rows)] = tokens // len(rows)
        self.rates.append(seconds / tokens)


class Dispatcher:
    def __init__(self, actors: Sequence[Any], *, timeout_s: float = 600.0, max_attempts: int = 3,
                 poll_s: float = 1.0, hang: HangLimit | None = None, joiner: Any = None) -> None:
        if not actors:
            raise ValueError("the dispatcher needs at least one actor")
        self.actors = list(actors)
        self.joiner = joiner  # replicas that join while we run: poll() -> loaded actors; pending
        self.timeout_s = timeout_s
        self.hang = hang or HangLimit(timeout_s)
        self.max_attempts = max_attempts
        self.poll_s = poll_s
        self.resubmissions = 0
        self._restarting: dict[Any, Any] = {}  # readiness probe -> actor that is loading (or Ray restarts)
        self._answered: set[int] = set()  # ids of actors that answered once: they had loaded

    @property
    def loading(self) -> int:
        """Actors not answering yet (their model loading, or loading again after a restart)."""
        return len(self._restarting)

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
        for actor in self.actors:  # a first task waits until its actor has loaded: loading is never timed
            if id(actor) not in self._answered:
                self._answered.add(id(actor))
                self._await_restart(actor)
        restarting = {id(actor) for actor in self._restarting.values()}
        idle = [actor for actor in self.actors if id(actor) not in restarting]
        in_flight: dict[Any, tuple[Any, Task, float, float, str]] = {}  # ref -> actor, task, start, limit, why
        while queue or in_flight:
            idle.extend(self._joined())
            while queue and idle:
                actor = idle.pop(0)
                task = self._take(queue, actor)
                ref = task.submit(actor)
                in_flight[ref] = (actor, task, time.monotonic(), self.hang.limit(task), self.hang.describe(task))
            if not (in_flight or self._restarting):
                if self.joiner is not None and self.joiner.pending:  # the pool is empty until one joins
                    time.sleep(self.poll_s)
                    continue
                raise RuntimeError(f"every evaluator died for good; {len(queue)} task(s) left undone. The Ray "
                                   f"logs of the evaluator processes say why (e.g. its model no longer loads)")
            waiting = [*in_flight, *self._restarting]
            ready, rest = ray.wait(waiting, num_returns=1, timeout=self.poll_s)
            if ready and rest:  # everything else already done too: every free actor is seen before work is handed out
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in self._restarting:
                    idle.extend(self._restarted(ref))
                    continue
                actor, task, started, *_ = in_flight.pop(ref)
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
                self.hang.observe(task, rows, time.monotonic() - started)
                idle.append(actor)
                yield Outcome(task, rows)
            now = time.monotonic()
            for ref, (actor, task, started, limit, why) in list(in_flight.items()):
                if now - started > limit:
                    log.warning("evaluation of %d masks exceeded %.0f s (%s): restarting its actor",
                                len(task.masks), limit, why)
                    del in_flight[ref]
                    ray.kill(actor, no_restart=False)
                    self._await_restart(actor)
                    yield from self._retry(queue, task, "timed out")

    def _joined(self) -> list[Any]:
        """Replicas that joined the pool since the last look (loaded: they work at once)."""
        if self.joiner is None:
            return []
        joined = self.joiner.poll()
        for actor in joined:
            self.actors.append(actor)
            self._answered.add(id(actor))
        return joined

    def _take(self, queue: deque[Task], actor: Any) -> Task:
        """The first queued task that prefers ``actor``, else the first queued task (an idle actor
        never waits for work that prefers another)."""
        index = next((i for i, a in enumerate(self.actors) if a is actor), None)
        for position, task in enumerate(queue):
            if task.prefer is not None and index is not None and task.prefer % len(self.actors) == index:
                del queue[position]  # by position: tasks compare by value, and Call arguments may be arrays
                return task
        return queue.popleft()

    def _await_restart(self, actor: Any) -> None:
        """Keep ``actor`` out of work until it answers (its model loaded, or loaded again)."""
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
