"""A cheap content fingerprint of a Hugging Face model directory.

Cached evaluations are keyed by the model's fingerprint, so it must change when the weights change
and cost next to nothing on a 70B checkpoint (about 140 GB in fp16, where hashing every byte takes
minutes per actor start). It therefore hashes:

- ``config.json`` as canonical JSON (sorted keys, no whitespace), without ``transformers_version``
  (re-saving with another transformers release changes no weight);
- for every ``*.safetensors`` file, sorted by name: the name, the size in bytes, and the sha256 of
  its first and last MiB.

The first MiB holds the safetensors header (every tensor's name, dtype, shape and offsets), so any
change of architecture, dtype or slicing shows; the last MiB and the size catch changed weights at
the end and appended or truncated data. Not caught: an edit of a middle tensor that keeps every
shape and the file size. Fine-tuned or pruned checkpoints change far more than that; an in-place
edit of one tensor should be saved under a new directory name and is then a new model anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["model_fingerprint"]

_MIB = 1 << 20


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 hex of ``path``'s config.json and its safetensors files' names, sizes and end MiBs.

    Raises ValueError when ``path`` has no config.json or no ``*.safetensors`` file.
    """
    path = Path(path)
    config_file = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    if not config_file.is_file() or not weights:
        raise ValueError(
            f"{path} is not a safetensors model directory (needs config.json and *.safetensors); "
            "resolve the model with actors.models.resolve_model first."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("transformers_version", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for file in weights:
        entry = [file.name, file.stat().st_size, *_end_hashes(file)]
        digest.update(json.dumps(entry, separators=(",", ":")).encode())
    return digest.hexdigest()


def _end_hashes(file: Path) -> tuple[str, str]:
    """sha256 hex of the first and of the last MiB of ``file`` (the same bytes when it is small)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(_MIB)
        handle.seek(max(size - _MIB, 0))
        tail = handle.read(_MIB)
    return hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()
