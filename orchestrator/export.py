"""``rayprune export``: a compact model from a run directory, or from a model and a pruning_config.json.

- ``rayprune export RUN [--step K] [--out DIR]``: the model after step ``K`` of the run's path (the
  last step by default; 0 is the dense model), with SPRINT's refitted ``down_proj`` weights of that
  step. A campaign already writes its final model to ``RUN/model``; this rebuilds it (e.g. after
  ``export: false``) or exports any prefix of the path (default ``RUN/model-step-K``).
- ``rayprune export MODEL --pruning-config FILE --out DIR``: a MultiPruner ``pruning_config.json``
  (such as those published with the paper) applied to its model.

The result loads with ``actors.export.load_pruned`` (stock transformers classes). An export never
replaces what it did not write (``actors.export.check_export_target``); one that writes into a run
directory holds the run's lock, so it waits for no one and is refused while a campaign runs there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from search_spaces import Mask

from .rundir import RunDir, RunDirectoryBusy, step_entry


def export_run(run_dir: str | os.PathLike[str], *, step: int | None = None, out: str | os.PathLike[str] | None = None,
               dtype: str | None = None) -> Path:
    """Write the model after ``step`` of a run's path (None: the last step) to ``out``, in ``dtype``
    (None: the dtype the run's search ran in, as ``path.json`` records it; float32 for older runs),
    with the run's channel order (``permutation.safetensors``), so a width keeps the channels the
    search scored whatever the dtype.

    An ``out`` inside the run directory (the default) is written under the run's lock:
    RunDirectoryBusy while a campaign (or another export) holds it. ValueError for a step off the
    path, a run without a model, or an ``out`` an export may not replace.
    """
    from actors.export import export_compact

    rundir = RunDir(run_dir)
    path = rundir.read_path()
    steps = path["steps"]
    dtype = dtype or path.get("dtype") or "float32"
    model = rundir.read_config().get("model")
    if not model:
        raise ValueError(f"{rundir.file('config.yaml')} names no model; export with MODEL --pruning-config "
                         f"{rundir.file('pruning_config.json')} instead")
    last = len(steps)
    step = last if step is None else step
    if not 0 <= step <= last:
        raise ValueError(f"step {step} is not on the path of {rundir.path} (0..{last}); pick one of those")
    entry = step_entry({"steps": steps}, step)
    target = Path(out) if out else rundir.file("model" if step == last else f"model-step-{step}")
    if not _inside(target, rundir.path):
        return export_compact(str(model), Mask.from_dict(entry["mask"]), target, dtype=dtype,
                              tuned=rundir.step_weights(entry), permutation=rundir.permutation_or_warn())
    try:
        rundir.lock()
    except RunDirectoryBusy:
        raise RunDirectoryBusy(
            f"{rundir.path} is locked: a campaign is running there (or another export), and a campaign writes "
            f"its own {rundir.file('model')} at its end; wait for it to finish and export again, or give an --out "
            f"outside the run directory") from None
    try:
        return export_compact(str(model), Mask.from_dict(entry["mask"]), target, dtype=dtype,
                              tuned=rundir.step_weights(entry), permutation=rundir.permutation_or_warn())
    finally:
        rundir.unlock()


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path`` is ``directory`` or lies under it (symbolic links followed)."""
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def export_pruning_config(model: str, pruning_config: str | os.PathLike[str], out: str | os.PathLike[str], *,
                          dtype: str = "float32") -> Path:
    """Write ``model`` pruned as a MultiPruner ``pruning_config.json`` says to ``out``."""
    from actors.export import export_compact
    from actors.models import read_model_config
    from search_spaces import Arch
    from search_spaces.pruning_config import mask_from_pruning_config

    try:
        data = json.loads(Path(pruning_config).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--pruning-config {pruning_config}: cannot be read as JSON ({exc})") from exc
    mask = mask_from_pruning_config(data, Arch.from_hf_config(read_model_config(model)))
    return export_compact(model, mask, out, dtype=dtype)
