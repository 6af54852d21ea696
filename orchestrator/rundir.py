"""The run directory and its one owner: every file of ``runs/<name>/`` is read and written here.

What a run directory holds (README, "What the demo prints"):

- ``.lock``: held by the driver that runs the campaign (``flock``), so a second driver is refused;
- ``config.yaml`` (the resolved config), ``calibration.parquet`` (the exact token windows);
- ``permutation.safetensors``: the channel order every replica, export and eval of the run uses
  (:mod:`actors.permutation`; computed once from the checkpoint);
- ``evals/``: the Parquet cache (:mod:`orchestrator.cache` owns its parts; this module names it);
- ``path.json``: the removal path, ``pruning_config.json``, ``search.json`` (a whole-mask search);
- ``sprint/``: SPRINT's ``latency.json``, step results ``steps/<key>.json`` and refitted weights
  ``weights/<sha256>.safetensors`` (:class:`StepStore`);
- ``model/`` (the compact export), ``report.md`` and its pictures.

Every write goes through :func:`orchestrator.files.atomic_write`: a reader sees the old file or the
new one, never a torn one. Readers raise ValueError naming the file and the fix.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from .files import atomic_write, write_json, write_via

if TYPE_CHECKING:
    import numpy as np

    from actors.permutation import Permutation

    from search_spaces import Mask

    from .config import Config

log = logging.getLogger("rayprune")

PATH_FILE = "path.json"
CONFIG_FILE = "config.yaml"
PERMUTATION_FILE = "permutation.safetensors"


class RunDirectoryBusy(RuntimeError):
    """Another driver holds this run directory."""


class RunDir:
    """A run directory. ``lock()`` before writing; the readers work on any run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock_file: IO[str] | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def evals(self) -> Path:
        """The evaluation cache's directory."""
        return self.path / "evals"

    @property
    def steps(self) -> StepStore:
        return StepStore(self.path)

    # ---- the lock -----------------------------------------------------------------------------------
    def lock(self) -> RunDir:
        """Refuse to share the run directory with a second driver. A new run directory is created
        readable by its owner only (0700): it holds weights, scores and the study's journal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(mode=0o700, exist_ok=True)
        self._lock_file = open(self.path / ".lock", "a+")  # not "w": a refused driver must not truncate it
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise RunDirectoryBusy(
                f"{self.path} is in use by another rayprune driver; wait for it to finish, or "
                f"set output= to another directory"
            ) from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        return self

    def unlock(self) -> None:
        """Free the run directory for the next driver."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

    def __enter__(self) -> RunDir:
        return self.lock()

    def __exit__(self, *exc_info: object) -> None:
        self.unlock()

    # ---- path.json ----------------------------------------------------------------------------------
    @property
    def path_file(self) -> Path:
        return self.file(PATH_FILE)

    def has_path(self) -> bool:
        return self.file(PATH_FILE).is_file()

    def read_path(self) -> dict[str, Any]:
        """The removal path; ValueError naming the file when it is missing or malformed."""
        file = self.file(PATH_FILE)
        if not file.is_file():
            raise ValueError(f"{self.path} has no {PATH_FILE}: not a run directory, or its campaign has not "
                             f"finished; run `rayprune run {file.with_name(CONFIG_FILE)}` to finish it")
        try:
            path = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{file} cannot be read ({exc}); rerun the campaign to rewrite it") from None
        if not isinstance(path, dict) or not isinstance(path.get("steps"), list):
            raise ValueError(f"{file} is not a removal path (no list of steps); rerun the campaign to rewrite it")
        return path

    def write_path(self, path: Mapping[str, Any]) -> None:
        write_json(self.file(PATH_FILE), dict(path))

    # ---- config.yaml and the windows -----------------------------------------------------------------
    def has_config(self) -> bool:
        return self.file(CONFIG_FILE).is_file()

    def read_config(self) -> dict[str, Any]:
        """The run's resolved ``config.yaml`` as a plain dict ({} when absent)."""
        import yaml

        file = self.file(CONFIG_FILE)
        if not file.is_file():
            return {}
        try:
            config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{file} cannot be read ({exc}); fix it or rerun the campaign") from None
        if not isinstance(config, dict):
            raise ValueError(f"{file} is not a config (a mapping of keys); fix it or rerun the campaign")
        return config

    def keep_history(self, config: Config) -> list[str]:
        """Before ``config`` replaces the run's ``config.yaml``: when it changes what the path means
        (model, data, method or its settings; not the target, the cluster or the output), move the
        earlier ``path.json``, ``config.yaml`` and ``pruning_config.json`` to ``history/<time>/``.
        Returns the changed keys (empty: nothing moved). The cache stays: its rows are keyed by
        model and windows, so nothing is served across the change."""
        import time

        import yaml

        from .config_load import to_yaml

        old = self.read_config()
        if not old or not self.has_path():
            return []
        before = _flat(old)
        changed = sorted(k for k in _differing(before, _flat(yaml.safe_load(to_yaml(config))))
                         if k in before  # a key an older rayprune did not write is not a change
                         and k.split(".")[0] not in _SAME_PATH_TOP and k not in _SAME_PATH_KEYS)
        if changed:
            target = self.path / "history" / time.strftime("%Y%m%d-%H%M%S")
            target.mkdir(parents=True, exist_ok=True)
            for name in (PATH_FILE, CONFIG_FILE, "pruning_config.json"):
                if self.file(name).is_file():
                    os.replace(self.file(name), target / name)
        return changed

    def write_config(self, config: Config) -> None:
        from .config_load import to_yaml

        atomic_write(self.file(CONFIG_FILE), to_yaml(config))

    def write_calibration(self, windows: np.ndarray) -> None:
        from .data.windows import write_windows

        write_windows(self.file("calibration.parquet"), windows)

    # ---- the channel order ---------------------------------------------------------------------------
    def read_permutation(self) -> Permutation | None:
        """The run's channel order; None when the run has none yet (or predates them). A corrupt file
        is reported and treated as missing: the order is computed again from the checkpoint."""
        from actors.permutation import BadPermutation, Permutation

        file = self.file(PERMUTATION_FILE)
        if not file.is_file():
            return None
        try:
            return Permutation.load(file)
        except BadPermutation as exc:
            log.warning("%s; computing the order again", exc)
            return None

    def write_permutation(self, permutation: Permutation) -> None:
        """Store the order the run's replicas use (atomically); unchanged files are not rewritten."""
        known = self.read_permutation()
        if known is None or known.digest != permutation.digest or known.checkpoint != permutation.checkpoint:
            payload = permutation.to_bytes()
            write_via(self.file(PERMUTATION_FILE), lambda handle: handle.write(payload))

    def permutation_or_warn(self) -> Permutation | None:
        """For ``export`` and ``eval`` of a finished run: its order, or None (the checkpoint's own
        order) with a warning when the run predates stored orders."""
        permutation = self.read_permutation()
        if permutation is None:
            log.warning("%s has no %s (a run from before rayprune stored its channel order): using the order "
                        "computed from the checkpoint in float64, which may keep other channels than the search "
                        "scored at near-ties", self.path, PERMUTATION_FILE)
        return permutation

    # ---- the other outputs ---------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        """``pruning_config.json``, ``search.json``, ``tune_best.json``, ...: JSON, atomically."""
        write_json(self.file(name), data)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.file(name), text)

    # ---- artefacts and the path they must match ------------------------------------------------------
    def stale_artefacts(self, path: Mapping[str, Any] | None = None) -> list[str]:
        """What in the run directory holds another model than ``path.json`` says (one line each):
        ``model/`` vs the final step, ``model-step-K/`` vs step K, ``pruning_config.json`` vs the
        final mask, and a width-pruned export made with another channel order than the run's
        ``permutation.safetensors``. Empty when everything matches (or there is nothing to compare)."""
        from search_spaces import Arch
        from search_spaces.pruning_config import mask_to_pruning_config

        path = self.read_path() if path is None else path
        steps = path["steps"]
        found = []
        permutation = self.read_permutation()
        exports = {len(steps): self.file("model")}
        for directory in self.path.glob("model-step-*"):
            number = directory.name.removeprefix("model-step-")
            if number.isdigit() and int(number) <= len(steps):
                exports[int(number)] = directory
        for step, directory in sorted(exports.items()):
            held = exported_model(directory)
            if held is None:
                continue
            entry = step_entry(path, step)
            expected = (_as_mask(entry["mask"]), dict(entry.get("tuned_weights") or {}))
            rebuild = f"rebuild it with `rayprune export {self.path}{'' if step == len(steps) else f' --step {step}'}`"
            if (_as_mask(held[0]), held[1]) != expected:
                found.append(f"{directory.name}/ holds another model than step {step} of {PATH_FILE} "
                             f"(an earlier run's); {rebuild}")
            elif (permutation is not None and (expected[0].mlp_width or expected[0].head_units)
                  and held[2] != permutation.tag):  # only widths depend on the order
                found.append(f"{directory.name}/ keeps its widths' channels in another order than the run's "
                             f"{PERMUTATION_FILE} ({held[2]} vs {permutation.tag}); {rebuild}")
        pruning_config = self.file("pruning_config.json")
        if pruning_config.is_file() and isinstance(path.get("arch"), dict):
            expected = mask_to_pruning_config(final_mask(path), Arch(**path["arch"]))
            try:
                held_config = json.loads(pruning_config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                held_config = None
            if held_config != json.loads(json.dumps(expected)):
                found.append(f"pruning_config.json holds another mask than the final step of {PATH_FILE}")
        return found

    def step_weights(self, entry: Mapping[str, Any]) -> dict[int, np.ndarray]:
        """MLP layer -> refitted ``down_proj`` of the model after a path step (a ``path.json``
        entry); empty for steps without refits and for the other methods' paths."""
        names = entry.get("tuned_weights") or {}
        if not names:
            return {}
        store = self.steps
        return {int(layer): store.load_weight(sha) for layer, sha in names.items()}


def final_mask(path: dict) -> Mask:
    """The mask after the last step: its ``mask`` entry, else replayed from the step kinds."""
    from search_spaces import Block, Mask

    steps = path["steps"]
    if not steps:
        return Mask()
    if "mask" in steps[-1]:
        return Mask.from_dict(steps[-1]["mask"])
    mask = Mask()
    for s in steps:  # path.json files older than the "mask" entry
        if s["kind"] in ("attn", "mlp"):
            mask = mask.remove(Block(s["layer"], s["kind"]))
        elif s["kind"] == "attn_width":
            mask = mask.with_heads(s["layer"], s["width"])
        else:
            mask = mask.with_mlp_width(s["layer"], s["width"])
    return mask


#: Keys that change where a search stops or where it runs, not what its path means.
_SAME_PATH_TOP = {"name", "output", "export", "cluster", "recovery"}
_SAME_PATH_KEYS = {"search.target_ratio", "search.max_steps", "search.target_speedup"}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def _as_mask(data: Mapping[str, Any]) -> Mask:
    from search_spaces import Mask

    return Mask.from_dict(data)


def exported_model(directory: Path) -> tuple[dict[str, Any], dict[str, str], str | None] | None:
    """(mask, refitted weights by layer, channel order tag) that a compact export in ``directory``
    records in its ``config.json`` (``rayprune`` entry); None when ``directory`` is not such an export."""
    try:
        entry = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("rayprune")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("mask"), dict):
        return None
    return entry["mask"], dict(entry.get("tuned") or {}), entry.get("reordered")


def step_entry(path: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The ``path.json`` entry of the model after ``step`` (0: dense), with its ``mask``."""
    from search_spaces import Mask

    steps = path["steps"]
    if step == 0:
        return {"mask": Mask().to_dict()}
    if "mask" in steps[step - 1]:
        return steps[step - 1]
    return {"mask": final_mask({"steps": steps[:step]}).to_dict()}  # files older than the per-step "mask"


class StepStore:
    """``<run>/sprint/``: step results by request key, refitted weights by content hash."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir) / "sprint"

    def get(self, key: str) -> dict[str, Any] | None:
        file = self.root / "steps" / f"{key}.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def put(self, key: str, result: Mapping[str, Any]) -> None:
        write_json(self.root / "steps" / f"{key}.json", dict(result))

    def write_latency(self, table: Mapping[str, Any]) -> None:
        write_json(self.root / "latency.json", dict(table))

    def weight_path(self, sha: str) -> Path:
        return self.root / "weights" / f"{sha}.safetensors"

    def save_weight(self, array: np.ndarray, sha: str) -> None:
        """Store ``array`` under ``sha``; ValueError when the content does not hash to it."""
        import numpy as np
        from safetensors.numpy import save

        from search_spaces.sprint import tensor_key

        array = np.ascontiguousarray(array, dtype=np.float32)
        if tensor_key(array.shape, "float32", array.tobytes()) != sha:
            raise ValueError(f"refitted weights do not hash to {sha}; the evaluator sent corrupted data, rerun")
        path = self.weight_path(sha)
        if not path.is_file():
            payload = save({"weight": array})
            write_via(path, lambda handle: handle.write(payload))

    def discard_weight(self, sha: str) -> None:
        """Remove refitted weights no path names (a step's candidates that were not chosen)."""
        self.weight_path(sha).unlink(missing_ok=True)

    def load_weight(self, sha: str) -> np.ndarray:
        from safetensors.numpy import load_file

        path = self.weight_path(sha)
        if not path.is_file():
            raise FileNotFoundError(f"refitted weights {sha} are not in {path.parent}; the run directory is "
                                    f"incomplete: rerun the campaign to recompute them")
        return load_file(str(path))["weight"]
