"""Refitted weights by content hash: read from files the replica can see, fetched otherwise.

SPRINT names every refitted ``down_proj`` by the sha256 of its content (``tensor_key``). The driver
keeps them as files in the run directory (``sprint/weights/<sha>.safetensors``) and tells a replica
where each one is (a *source*): a path, an ``ObjectRef``, or the array itself. A path is read only
when this process can see it (a local Ray session, a run directory on a shared mount) and its content
hashes to its name; otherwise the sha is reported missing and the driver sends an ``ObjectRef``
instead. So weights never travel through the object store when the files are shared, and each one
travels once per replica when they are not: a replica keeps what it fetched (:class:`WeightMemo`)
until a request no longer names it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch

from search_spaces.sprint import tensor_key


def _checked(array: np.ndarray, sha: str) -> np.ndarray | None:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return array if tensor_key(tuple(array.shape), "float32", array.tobytes()) == sha else None


def _read(source: Any, sha: str) -> np.ndarray | None:
    """The array ``source`` holds, if it can be had here and hashes to ``sha``; else None."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors.numpy import load_file

        try:
            return _checked(load_file(os.fspath(source))["weight"], sha)
        except (OSError, KeyError):  # not on this machine's filesystem (or not a weight file)
            return None
    if isinstance(source, np.ndarray | torch.Tensor):
        return _checked(np.asarray(source), sha)
    import ray

    return _checked(np.asarray(ray.get(source)), sha)  # an ObjectRef


class WeightMemo:
    """The refitted weights this replica holds, by content hash."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def resolve(self, sources: Mapping[str, Any], keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Bring every weight of ``sources`` here; return the shas it could not get (the driver then
        sends them by reference). Afterwards only the weights ``sources`` or ``keep`` name are kept."""
        missing = []
        for sha, source in sources.items():
            if sha in self.weights:
                continue
            array = _read(source, sha)
            if array is None:
                missing.append(sha)
            else:
                self.weights[sha] = torch.from_numpy(array)
        wanted = set(sources) | set(keep)
        self.weights = {k: v for k, v in self.weights.items() if k in wanted}
        return missing

    def add(self, sha: str, weight: torch.Tensor) -> None:
        """Keep a weight made here (a refit this replica solved), fp32 on the host."""
        self.weights[sha] = weight.detach().to("cpu", torch.float32)
