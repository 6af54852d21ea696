"""``python -m tests.killpoints POINT rayprune-args...``: ``rayprune`` that dies at a chosen write.

The process ends with ``os._exit(137)`` (no ``finally``, no flush, as a SIGKILL would) at:

- ``flush``: the second cache flush (a part being written);
- ``compaction``: after the merged part is written, before the merged parts are deleted;
- ``path.json`` / ``pruning_config.json``: just before that file is written;
- ``export``: as the compact model's export starts;
- ``mirror``: in the middle of the URI mirror (after its first uploaded file);
- ``generation``: in the middle of an evolution's second generation (its offspring scored on the
  first windows and cached, its survivors not yet on every window).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

POINTS = ("flush", "compaction", "path.json", "pruning_config.json", "export", "mirror")
SEARCH_POINTS = ("generation",)  # not on every campaign's route: tested by the searches they belong to


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(137)


def install(point: str) -> None:
    import actors.export
    import orchestrator.files
    import orchestrator.storage

    if point not in POINTS + SEARCH_POINTS:
        raise SystemExit(f"unknown kill point {point!r}; use one of {', '.join(POINTS + SEARCH_POINTS)}")
    calls = {"n": 0}
    write_via, remove, copy = orchestrator.files.write_via, orchestrator.files.remove, orchestrator.storage._copy

    def killing_write_via(path, write):
        name = Path(path).name
        if point == "flush" and name.startswith("part-"):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
        if name == point:
            die()
        return write_via(path, write)

    def killing_remove(path):
        if point == "compaction":
            die()
        return remove(path)

    def killing_copy(src, dst):
        copy(src, dst)
        calls["n"] += 1
        if point == "mirror" and calls["n"] == 1:
            die()

    def killing_export(*args, **kwargs):
        die()

    # Every writer looks these names up at call time in its own module: patch each binding.
    for module in [m for name, m in sys.modules.items() if name.startswith("orchestrator")] + [orchestrator.files]:
        if getattr(module, "write_via", None) is write_via:
            module.write_via = killing_write_via
        if getattr(module, "remove", None) is remove:
            module.remove = killing_remove
    orchestrator.storage._copy = killing_copy
    if point == "export":
        actors.export.export_compact = killing_export
    if point == "generation":
        from orchestrator.search.evolution import EvolutionSearcher

        observe = EvolutionSearcher.observe

        def killing_observe(self, scores):
            if self.generation == 1 and self._stage == "low":  # generation 2's offspring, on few windows
                die()
            return observe(self, scores)

        EvolutionSearcher.observe = killing_observe


if __name__ == "__main__":
    import orchestrator.cache  # noqa: F401 - imported before patching, so its binding is patched
    import orchestrator.cli
    import orchestrator.data.windows  # noqa: F401
    import orchestrator.rundir  # noqa: F401

    install(sys.argv[1])
    sys.exit(orchestrator.cli.main(sys.argv[2:]))
