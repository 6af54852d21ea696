"""``rayprune export``: a compact model from a run directory, or from a model and a pruning_config.json.

- ``rayprune export RUN [--step K] [--out DIR]``: the model after step ``K`` of the run's path (the
  last step by default; 0 is the dense model), with SPRINT's refitted ``down_proj`` weights of that
  step. A campaign already writes its final model to ``RUN/model``; this rebuilds it (e.g. after
  ``export: false``) or exports any prefix of the path (default ``RUN/model-step-K``).
- ``rayprune export MODEL --pruning-config FILE --out DIR``: a MultiPruner ``pruning_config.json``
  (such as those published with the paper) applied to its model.

The result loads with ``actors.export.load_pruned`` (stock transformers classes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from search_spaces import Mask

from .rundir import RunDir, step_entry


def export_run(run_dir: str | os.PathLike[str], *, step: int | None = None, out: str | os.PathLike[str] | None = None,
               dtype: str = "float32") -> Path:
    """Write the model after ``step`` of a run's path (None: the last step) to ``out``."""
    from actors.export import export_compact

    rundir = RunDir(run_dir)
    steps = rundir.read_path()["steps"]
    model = rundir.read_config().get("model")
    if not model:
        raise ValueError(f"{rundir.file('config.yaml')} names no model; export with MODEL --pruning-config "
                         f"{rundir.file('pruning_config.json')} instead")
    last = len(steps)
    step = last if step is None else step
    if not 0 <= step <= last:
        raise ValueError(f"step {step} is not on the path of {rundir.path} (0..{last}); pick one of those")
    entry = step_entry({"steps": steps}, step)
    default = rundir.file("model" if step == last else f"model-step-{step}")
    return export_compact(str(model), Mask.from_dict(entry["mask"]), Path(out) if out else default, dtype=dtype,
                          tuned=rundir.step_weights(entry))


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
