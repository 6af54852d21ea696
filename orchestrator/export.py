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


def export_run(run_dir: str | os.PathLike[str], *, step: int | None = None, out: str | os.PathLike[str] | None = None,
               dtype: str = "float32") -> Path:
    """Write the model after ``step`` of a run's path (None: the last step) to ``out``."""
    from actors.export import export_compact

    from .report import final_mask, run_config
    from .sprint_campaign import step_weights

    run_dir = Path(run_dir)
    if not (run_dir / "path.json").is_file():
        raise ValueError(f"{run_dir} has no path.json: not a run directory, or its campaign has not finished; "
                         f"run `rayprune run {run_dir / 'config.yaml'}` to finish it")
    model = run_config(run_dir).get("model")
    if not model:
        raise ValueError(f"{run_dir / 'config.yaml'} names no model; export with MODEL --pruning-config "
                         f"{run_dir / 'pruning_config.json'} instead")
    steps = json.loads((run_dir / "path.json").read_text())["steps"]
    last = len(steps)
    step = last if step is None else step
    if not 0 <= step <= last:
        raise ValueError(f"step {step} is not on the path of {run_dir} (0..{last}); pick one of those")
    if step == 0:
        entry: dict = {"mask": Mask().to_dict()}
    elif "mask" in steps[step - 1]:
        entry = steps[step - 1]
    else:  # path.json files older than the per-step "mask" entry
        entry = {"mask": final_mask({"steps": steps[:step]}).to_dict()}
    default = run_dir / ("model" if step == last else f"model-step-{step}")
    return export_compact(str(model), Mask.from_dict(entry["mask"]), Path(out) if out else default, dtype=dtype,
                          tuned=step_weights(run_dir, entry))


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
