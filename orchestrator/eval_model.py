"""``rayprune eval``: held-out perplexity (and zero-shot accuracy) of a run, an export or a model.

What ``MODEL_OR_RUN`` names decides what is evaluated:

- a run directory (it holds ``path.json`` or ``config.yaml``): its compact export ``model/`` when it
  holds the final model of ``path.json`` (a stale ``model/``, left by an earlier run, is named in a
  warning and not used); a run without one gets the final mask of ``path.json`` applied in memory to the configured model (L1
  reordered, physically sliced, SPRINT's refitted ``down_proj`` weights restored: what
  ``export_compact`` would write, with the run's stored channel order). The held-out settings
  default to the run's ``data.corpus`` and ``data.evaluation``, and the dtype to the one its search
  ran in (``path.json``), so the figure repeats the run's own;
- a compact export (its ``config.json`` has a ``rayprune`` entry): loaded with ``load_pruned``;
- anything else is a dense model: a preset, a local Hugging Face directory or a hub id.

``dtype`` (``--dtype``) overrides: ``auto`` is what a replica on this machine would use (fp32 on a
CPU); an export is cast after loading.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("rayprune")


@dataclass
class Target:
    """A loaded model to evaluate, and where its default held-out settings come from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "run export" | "run (masked in memory)" | "compact export" | "dense"
    source: str
    evaluation: dict[str, Any] = field(default_factory=dict)  # corpus, sequences, length, seed
    recorded: dict[str, Any] | None = None  # path.json's held-out figures, for a run

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")


def _is_run_dir(path: Path) -> bool:
    from .rundir import RunDir

    rundir = RunDir(path)
    return path.is_dir() and not (path / "config.json").is_file() and (rundir.has_path() or rundir.has_config())


def _is_export(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return "rayprune" in json.loads((path / "config.json").read_text(encoding="utf-8"))


def _run_evaluation(config: dict[str, Any]) -> dict[str, Any]:
    """A run's held-out settings as its config.yaml resolved them (a paper protocol's included)."""
    data = config.get("data") or {}
    held = data.get("evaluation") or {}
    evaluation = {k: v for k, v in held.items() if k in ("sequences", "length", "seed")}
    return {"protocol": data.get("protocol", "rayprune"), "corpus": held.get("corpus") or data.get("corpus", "wikipedia"),
            **evaluation}


def load_target(spec: str, *, dtype: str | None = None) -> Target:
    """Load what ``spec`` names (see the module docstring) in ``dtype`` (None: a run's own, an
    export's stored one, fp32 for a dense model); raises ValueError with the fix."""
    from actors.export import compact_model, load_pruned
    from actors.models import load_model, load_tokenizer, resolve_dtype, resolve_model

    def cast(model: PreTrainedModel) -> PreTrainedModel:
        return model if dtype is None else model.to(resolve_dtype(dtype, "cpu"))

    from .rundir import RunDir, final_mask

    path = Path(spec).expanduser()
    if _is_run_dir(path):
        rundir = RunDir(path)
        config = rundir.read_config()
        run_path = rundir.read_path() if rundir.has_path() else None
        recorded = (run_path or {}).get("heldout")
        stale = rundir.stale_artefacts(run_path) if run_path is not None else []
        for problem in stale:
            log.warning("%s: %s", path, problem)
        if _is_export(path / "model") and not any(p.startswith("model/") for p in stale):
            return Target(cast(load_pruned(path / "model")), load_tokenizer(path / "model"), "run export",
                          str(path / "model"), _run_evaluation(config), recorded)
        if not config.get("model") or run_path is None:
            raise ValueError(f"{path} is a run directory without model/, and without the config.yaml model and "
                             f"path.json needed to rebuild it; finish the run first (`rayprune run {path / 'config.yaml'}`)")
        steps = run_path["steps"]
        tuned = rundir.step_weights(steps[-1]) if steps else {}  # SPRINT's refits are part of its model
        run_dtype = str(resolve_dtype(dtype, "cpu")).removeprefix("torch.") if dtype else run_path.get("dtype", "float32")
        model = compact_model(str(config["model"]), final_mask(run_path), tuned=tuned, dtype=run_dtype,
                              permutation=rundir.permutation_or_warn())
        return Target(model, load_tokenizer(resolve_model(str(config["model"]))), "run (masked in memory)",
                      f"{config['model']} + final mask of {rundir.path_file}", _run_evaluation(config), recorded)
    if path.is_dir() and _is_export(path):
        return Target(cast(load_pruned(path)), load_tokenizer(path), "compact export", str(path))
    source = resolve_model(spec)
    return Target(load_model(source, dtype=resolve_dtype(dtype or "float32", "cpu")), load_tokenizer(source), "dense", spec)


def evaluate_model(target: Target, *, corpus: str | None = None, sequences: int | None = None,
             length: int | None = None, seed: int | None = None, tasks: Sequence[str] = (),
             batch_size: int = 4, limit: int | None = None, protocol: str | None = None) -> dict[str, Any]:
    """Held-out perplexity, and zero-shot metrics for ``tasks``, as one JSON-ready dict.

    Unset settings come from the run's config, else from the config defaults (``DataConfig``).
    ``protocol`` (a paper's, see ``data.protocol``) cuts the held-out windows as that paper does,
    by default from its corpus (WikiText-2 test) at its length: ``--protocol multipruner`` gives
    the figure its tables report.
    """
    from actors.heldout import heldout_score, perplexity
    from actors.surgery import count_parameters

    from .config import PROTOCOLS, DataConfig, with_protocol
    from .data.windows import heldout_windows

    chosen = protocol or target.evaluation.get("protocol") or "rayprune"
    if chosen not in PROTOCOLS:
        raise ValueError(f"protocol {chosen!r} is not one of {', '.join(PROTOCOLS)}")
    default = with_protocol(DataConfig(protocol=chosen))
    base = {"corpus": default.evaluation.corpus or default.corpus, "sequences": default.evaluation.sequences,
            "length": default.evaluation.length, "seed": default.evaluation.seed}
    if protocol is None or protocol == target.evaluation.get("protocol"):
        base |= {k: v for k, v in target.evaluation.items() if k != "protocol"}  # the run's own settings
    given = {"corpus": corpus, "sequences": sequences, "length": length, "seed": seed}
    settings = base | {k: v for k, v in given.items() if v is not None} | {"protocol": chosen}
    windows = heldout_windows(target.tokenizer, settings["corpus"],
                              None if settings["sequences"] is None else int(settings["sequences"]),
                              int(settings["length"]), int(settings["seed"]), protocol=chosen)
    score = heldout_score(target.model, windows, batch_size=batch_size)
    result: dict[str, Any] = {
        "model": target.source, "kind": target.kind, "params": count_parameters(target.model), "dtype": target.dtype,
        "heldout": {"ppl": perplexity(score), "nll_sum": score.nll_sum, "tokens": score.tokens,
                    "seconds": score.seconds, **settings, "windows": int(windows.shape[0])},
    }
    if target.recorded and settings == base | {"protocol": chosen}:  # the run's own windows: comparable figures
        result["recorded_heldout"] = target.recorded
    if tasks:
        from actors.zeroshot import zero_shot

        result["tasks"] = zero_shot(target.model, target.tokenizer, tasks, batch_size=batch_size, limit=limit)
    return result


def format_result(result: dict[str, Any]) -> str:
    """The human-readable form ``rayprune eval`` prints without ``--json``."""
    held = result["heldout"]
    lines = [f"model: {result['model']} ({result['kind']}, {result['params']:,} parameters, {result.get('dtype', 'float32')})",
             f"held-out perplexity: {held['ppl']:.3f} ({_windows_line(held)}; {held['tokens']:,} predicted tokens, "
             f"{held['seconds']:.1f} s)"]
    recorded = result.get("recorded_heldout")
    if recorded and "pruned_ppl" in recorded:
        lines.append(f"recorded by the run (same windows): dense {recorded['dense_ppl']:.3f} -> pruned {recorded['pruned_ppl']:.3f}")
    for task, metrics in (result.get("tasks") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr") and k != "samples")
        errors = {k[: -len("_stderr")]: v for k, v in metrics.items() if k.endswith("_stderr")}
        lines.append(f"{task}: {shown}" + (f" (stderr {', '.join(f'{v:.4f}' for v in errors.values())})" if errors else "")
                     + f" on {int(metrics.get('samples', 0))} items")
    return "\n".join(lines)


def _windows_line(held: dict[str, Any]) -> str:
    protocol = held.get("protocol", "rayprune")
    windows = held.get("windows", held["sequences"])
    if protocol == "rayprune":
        return f"{held['corpus']} test split, {windows} x {held['length']} tokens, seed {held['seed']}"
    return f"{held['corpus']}, {windows} consecutive windows of {held['length']} tokens as the {protocol} protocol cuts them"
