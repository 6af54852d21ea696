"""Evaluators that inject one real fault each, for tests/orchestrator/test_faults.py.

Each class is a plain :class:`actors.evaluator.Evaluator` except for its fault. A fault happens
once per run (across every actor and every restart) thanks to a marker file created with
``O_EXCL`` in a directory of the test's choosing. Ray workers import this module by reference (the
repository root is their working directory); the settings travel with the class that
:func:`configure` builds, because that subclass is pickled by value.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Sequence

from actors.evaluator import Evaluator


def configure(cls: type[FaultyEvaluator], marker_dir: str | os.PathLike, **settings: Any) -> type:
    """A subclass of ``cls`` whose faults use ``marker_dir`` and ``settings`` (class attributes)."""
    unknown = sorted(k for k in settings if not hasattr(cls, k))
    if unknown:
        raise ValueError(f"{cls.__name__} has no settings {unknown}")
    return type(f"Configured{cls.__name__}", (cls,), {"marker_dir": str(marker_dir), **settings})


def events(marker_dir: str | os.PathLike, name: str) -> list[str]:
    """Lines appended by :meth:`FaultyEvaluator._note` under ``name`` (one per event, in order)."""
    path = os.path.join(marker_dir, f"{name}.log")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return handle.read().splitlines()


class FaultyEvaluator(Evaluator):
    marker_dir: str = ""

    def _once(self, name: str) -> bool:
        """True the first time any actor asks for ``name`` in ``marker_dir``, False ever after."""
        try:
            fd = os.open(os.path.join(self.marker_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def _note(self, name: str, line: str) -> None:
        """Append one line (written and fsynced before a fault strikes, so the test can read it)."""
        with open(os.path.join(self.marker_dir, f"{name}.log"), "a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())


class KilledOnce(FaultyEvaluator):
    """The first ``evaluate`` call of the run SIGKILLs its own process (by PID), mid-task."""

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        if self._once("killed"):
            self._note("killed", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().evaluate(window_set, masks, base, rows)


class HungOnce(FaultyEvaluator):
    """The first ``evaluate`` call of the run sleeps for ``sleep_s`` (past any test's timeout)."""

    sleep_s: float = 3600.0

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        if self._once("hung"):
            self._note("hung", f"{os.getpid()} {len(masks)}")
            time.sleep(self.sleep_s)
        return super().evaluate(window_set, masks, base, rows)


class RaisesOnMask(FaultyEvaluator):
    """A task holding ``mask_json`` raises: on its first attempt only, or every time (``always``)."""

    mask_json: str = ""
    always: bool = False

    def evaluate(self, window_set: str, masks: Sequence[str], base: str | None = None,
                 rows: Sequence[int] | None = None) -> list[dict[str, Any]]:
        if self.mask_json in masks:
            self._note("attempts", f"{os.getpid()} {len(masks)}")
            if self.always or self._once("raised"):
                raise ValueError(f"injected fault: cannot score {self.mask_json}")
        return super().evaluate(window_set, masks, base, rows)
