"""The run directory and its one owner: every file of ``runs/<name>/`` is read and written here.

What a run directory holds (README, "What the demo prints"):

- ``.lock``: held by the driver that runs the campaign (``flock``), so a second driver is refused;
- ``config.yaml`` (the resolved config), ``calibration.parquet`` (the exact token windows);
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
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Mapping

from .files import atomic_write, write_json, write_via

if TYPE_CHECKING:
    import numpy as np

    from search_spaces import Mask

    from .config import Config

PATH_FILE = "path.json"
CONFIG_FILE = "config.yaml"


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

    def write_config(self, config: Config) -> None:
        from .config_load import to_yaml

        atomic_write(self.file(CONFIG_FILE), to_yaml(config))

    def write_calibration(self, windows: np.ndarray) -> None:
        from .data.windows import write_windows

        write_windows(self.file("calibration.parquet"), windows)

    # ---- the other outputs ---------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        """``pruning_config.json``, ``search.json``, ``tune_best.json``, ...: JSON, atomically."""
        write_json(self.file(name), data)

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.file(name), text)

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

    def load_weight(self, sha: str) -> np.ndarray:
        from safetensors.numpy import load_file

        path = self.weight_path(sha)
        if not path.is_file():
            raise FileNotFoundError(f"refitted weights {sha} are not in {path.parent}; the run directory is "
                                    f"incomplete: rerun the campaign to recompute them")
        return load_file(str(path))["weight"]
