"""The importance order of MLP channels and attention head units: computed once, from the checkpoint.

Width pruning keeps "the first w channels" of an MLP and "the first u head units" (KV groups under
GQA) of an attention block, so both are sorted by L1 importance first (MultiPruner): MLP channel j
scores ``|gate_j|_1 + |up_j|_1``, a head unit the L1 norm of its q, k and v rows. Under GQA,
MultiPruner's ``reorder_in_attn_block`` repeats each KV head's k and v rows once per query head that
shares it before summing, so a unit scores ``|q rows|_1 + n_rep * (|k rows|_1 + |v rows|_1)``
(``kv_weight="n_rep"``, the default; ``"once"`` weighs them once, as rayprune did before issue #14).
Without GQA the two are the same order. Which channels a width keeps is therefore decided by this
order, and it must be the *same* order in every process that touches the model: each evaluator
replica, the export, ``rayprune eval`` and SPRINT's refitted ``down_proj`` columns.

Recomputing it per process is not: sorting a bf16 layer's scores in bf16 instead of fp32 changed 447
of 7,568 kept channels, and two fp32 summation orders moved 26-34 of 11,008 positions. So the order
is computed **once**, in float64 on the CPU, from the checkpoint's own tensors as stored (streamed from
the safetensors files a row block at a time; no model is loaded), never from a replica's weights in
its dtype. A campaign stores it in its run directory (``permutation.safetensors``) and hands the same
arrays to every replica; its digest is part of the model fingerprint, so cached scores always name
the order they were computed with.

File format: safetensors (no pickle) holding ``layers.<i>.mlp`` and ``layers.<i>.units`` (int64,
most important first) and metadata ``{"format": "1", "method": <METHOD or METHOD_KV_REP>,
"checkpoint": <model fingerprint>, "digest": <sha256 of the method and the arrays>}``. A file whose
arrays do not hash to its digest, or that is not a permutation of each layer's width, is refused.
The method names the head-unit score: ``l1-float64`` (k/v once, or no GQA: the order of every file
written before issue #14) or ``l1-float64-kvrep`` (k/v weighed n_rep times under GQA). Being part
of the digest, it gives the two orders of a GQA model different tags, so a stored order of the other
weighting is never reused for this one (:func:`permutation_for`) and an export made with it is
stale (``RunDir.stale_artefacts``); old files still load, for the exports and evals of their runs.

numpy only at import; torch is imported by :func:`apply_permutation_` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from search_spaces import Arch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT = "1"
METHOD = "l1-float64"  # k/v rows weighed once; also the name of the (single) order of a model without GQA
METHOD_KV_REP = "l1-float64-kvrep"  # GQA: k/v rows weighed once per query head that shares them (MultiPruner)
#: ``search.kv_weight``: how a GQA head unit's k and v rows count in its score.
KV_WEIGHTS: tuple[str, ...] = ("n_rep", "once")
#: Rows read at once when streaming a projection from a checkpoint (bounds the float64 copy: 64 MiB
#: for a row of 8192).
ROW_BLOCK = 1024


class BadPermutation(ValueError):
    """A stored permutation is corrupt, or belongs to another model (the message says which and why)."""


@dataclass(frozen=True, eq=False)
class Permutation:
    """Per layer, the order of MLP channels and of head units, most important first."""

    checkpoint: str  # fingerprint of the weights it was computed from (actors.fingerprint)
    mlp: tuple[np.ndarray, ...]
    units: tuple[np.ndarray, ...]
    method: str = field(default=METHOD)

    @cached_property
    def digest(self) -> str:
        """sha256 of the method and every array (int64, little-endian), in layer order."""
        h = hashlib.sha256(f"{self.method}\n{len(self.mlp)}\n".encode())
        for i, (mlp, units) in enumerate(zip(self.mlp, self.units)):
            for name, array in (("mlp", mlp), ("units", units)):
                data = np.ascontiguousarray(array, dtype="<i8")
                h.update(f"{i}.{name}:{data.size}\n".encode())
                h.update(data.tobytes())
        return h.hexdigest()

    @property
    def tag(self) -> str:
        """What the order adds to a model fingerprint: ``l1.<16 hex of the digest>``."""
        return f"l1.{self.digest[:16]}"

    def check(self, arch: Arch) -> None:
        """BadPermutation unless every layer's orders are permutations of ``arch``'s widths."""
        if len(self.mlp) != arch.num_layers or len(self.units) != arch.num_layers:
            raise BadPermutation(f"the permutation covers {len(self.mlp)} layers, the model has {arch.num_layers}")
        for i, (mlp, units) in enumerate(zip(self.mlp, self.units)):
            for name, order, width in (("mlp", mlp, arch.intermediate_size), ("units", units, arch.num_head_units)):
                if order.shape != (width,) or not np.array_equal(np.sort(order), np.arange(width)):
                    raise BadPermutation(f"layer {i}: the {name} order is not a permutation of {width} positions")

    def require_checkpoint(self, checkpoint: str, where: str) -> None:
        """BadPermutation unless the order was computed from the weights fingerprinted ``checkpoint``
        (``where``: what holds them, for the message)."""
        if self.checkpoint != checkpoint:
            raise BadPermutation(f"the channel order was computed from other weights ({self.checkpoint[:16]}...) "
                                 f"than {where} holds ({checkpoint[:16]}...): the model changed since the run "
                                 f"began; delete the run's permutation.safetensors, or use a new output directory")

    def is_identity(self) -> bool:
        return all(np.array_equal(o, np.arange(o.size)) for o in (*self.mlp, *self.units))

    # ---- safetensors bytes -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        tensors = {}
        for i, (mlp, units) in enumerate(zip(self.mlp, self.units)):
            tensors[f"layers.{i}.mlp"] = np.ascontiguousarray(mlp, dtype=np.int64)
            tensors[f"layers.{i}.units"] = np.ascontiguousarray(units, dtype=np.int64)
        metadata = {"format": FORMAT, "method": self.method, "checkpoint": self.checkpoint,
                    "digest": self.digest, "layers": str(len(self.mlp))}
        return save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "permutation") -> Permutation:
        """Parse :meth:`to_bytes`; BadPermutation (naming ``source``) for anything else."""
        from safetensors.numpy import load

        try:
            metadata = _header(data).get("__metadata__") or {}
            tensors = load(data)
            layers = int(metadata["layers"])
            mlp = tuple(tensors[f"layers.{i}.mlp"] for i in range(layers))
            units = tuple(tensors[f"layers.{i}.units"] for i in range(layers))
        except Exception as exc:  # noqa: BLE001 - any parse failure is one kind of problem
            raise BadPermutation(f"{source} is not a rayprune permutation file ({exc}); delete it and it is "
                                 f"computed again from the checkpoint") from exc
        if metadata.get("format") != FORMAT:
            raise BadPermutation(f"{source} has format {metadata.get('format')!r}, this rayprune reads {FORMAT!r}; "
                                 f"delete it and it is computed again from the checkpoint")
        permutation = cls(metadata.get("checkpoint", ""), mlp, units, metadata.get("method", METHOD))
        if permutation.digest != metadata.get("digest"):
            raise BadPermutation(f"{source} is corrupt: its orders do not hash to its recorded digest; delete it "
                                 f"and it is computed again from the checkpoint")
        return permutation

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a temporary file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(self.to_bytes())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Permutation:
        return cls.from_bytes(Path(path).read_bytes(), source=str(path))


# ---- computing it ------------------------------------------------------------------------------
def l1_method(arch: Arch, kv_weight: str = "n_rep") -> str:
    """The method name of the order ``kv_weight`` gives on ``arch`` (one name without GQA, where
    both weightings are the same order, so those models keep the tags of earlier runs)."""
    if kv_weight not in KV_WEIGHTS:
        raise ValueError(f"search.kv_weight {kv_weight!r} must be one of {', '.join(KV_WEIGHTS)}")
    return METHOD_KV_REP if kv_weight == "n_rep" and arch.heads_per_unit > 1 else METHOD


def l1_permutation(row_l1: Callable[[str], np.ndarray], arch: Arch, checkpoint: str, *,
                   kv_weight: str = "n_rep") -> Permutation:
    """The L1 order from ``row_l1(name)``: the float64 L1 norm of each row of projection ``name``
    (``layers.<i>.mlp.gate_proj`` ...). A head unit scores its q rows plus its KV head's k and v rows,
    these ``heads_per_unit`` times with ``kv_weight="n_rep"`` (MultiPruner's ``repeat``/``expand`` of
    k and v before the sum; its per-head mean divides every unit by the same count, so the order is
    the same) and once with ``"once"``. Ties keep the lower index first (a stable sort)."""
    method = l1_method(arch, kv_weight)
    hd, g, units = arch.head_dim, arch.heads_per_unit, arch.num_head_units
    kv_times = g if method == METHOD_KV_REP else 1
    mlp, heads = [], []
    for i in range(arch.num_layers):
        prefix = f"layers.{i}."
        channel = row_l1(prefix + "mlp.gate_proj") + row_l1(prefix + "mlp.up_proj")
        q = row_l1(prefix + "self_attn.q_proj").reshape(units, g * hd).sum(1)  # (units,)
        kv = (row_l1(prefix + "self_attn.k_proj").reshape(units, hd).sum(1)
              + row_l1(prefix + "self_attn.v_proj").reshape(units, hd).sum(1))  # (units,): one KV head each
        mlp.append(_descending(channel))
        heads.append(_descending(q + kv_times * kv))
    permutation = Permutation(checkpoint, tuple(mlp), tuple(heads), method)
    permutation.check(arch)
    return permutation


def _descending(scores: np.ndarray) -> np.ndarray:
    return np.argsort(-scores, kind="stable").astype(np.int64)


def checkpoint_permutation(path: str | os.PathLike[str], *, cache: bool = True, kv_weight: str = "n_rep") -> Permutation:
    """The order of the model in directory ``path``, from its safetensors files (see the module
    docstring). Cached per machine under ``cache_dir()/permutations/`` by model fingerprint and method."""
    from .fingerprint import model_fingerprint
    from .models import cache_dir, read_model_config

    path = Path(path)
    checkpoint = model_fingerprint(path)
    arch = Arch.from_hf_config(read_model_config(str(path)))
    method = l1_method(arch, kv_weight)
    key = checkpoint if method == METHOD else f"{checkpoint}\n{method}"  # METHOD: the name files had before
    cached = cache_dir() / "permutations" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
    if cache and cached.is_file():
        try:
            found = Permutation.load(cached)
            if found.checkpoint == checkpoint and found.method == method:
                return found
        except BadPermutation:
            pass  # recompute and overwrite
    permutation = l1_permutation(CheckpointRows(path).row_l1, arch, checkpoint, kv_weight=kv_weight)
    if cache:
        try:
            permutation.save(cached)
        except OSError:
            pass  # a read-only cache costs a recomputation next time, nothing else
    return permutation


def state_permutation(state: Mapping[str, Any], arch: Arch, checkpoint: str = "in-memory", *,
                      kv_weight: str = "n_rep") -> Permutation:
    """The order of in-memory weights (a ``state_dict``), as the checkpoint's would be: each tensor
    goes to the CPU and float64 before it is summed. For models that have no checkpoint (tests)."""
    import torch

    names = _projection_names(state.keys())

    def row_l1(name: str) -> np.ndarray:
        tensor = state[names[name]].detach().to("cpu")
        return np.abs(tensor.to(torch.float64).numpy()).sum(axis=1)

    return l1_permutation(row_l1, arch, checkpoint, kv_weight=kv_weight)


_PROJECTION = re.compile(r"(?:^|\.)(layers\.\d+\.(?:mlp\.(?:gate|up)_proj|self_attn\.[qkv]_proj))\.weight$")


def _projection_names(names: Any) -> dict[str, str]:
    """``layers.<i>.mlp.gate_proj`` -> the full tensor name, for every projection the order reads."""
    found = {}
    for name in names:
        if match := _PROJECTION.search(name):
            found[match.group(1)] = name
    return found


class CheckpointRows:
    """Row L1 norms of 2-D tensors in a directory of safetensors files, read through a memory map of
    one tensor, a block of rows at a time (F32, F16, BF16, F64), summed in float64."""

    _DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}

    def __init__(self, path: Path) -> None:
        self.files = sorted(Path(path).glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{path} holds no *.safetensors file to compute the channel order from")
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for file in self.files:
            with open(file, "rb") as handle:
                (size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(size))
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = (file, entry, 8 + size)
        self.names = _projection_names(self._where)

    def row_l1(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(f"the checkpoint has no {name}.weight; is it a Llama, Qwen2 or Mistral model?")
        file, entry, base = self._where[self.names[name]]
        kind = entry["dtype"]
        if kind not in self._DTYPES or len(entry["shape"]) != 2:
            raise ValueError(f"{file.name}: {self.names[name]} is {kind} {entry['shape']}; rayprune reads 2-D "
                             f"F32, F16, BF16 or F64 projections")
        start, _ = entry["data_offsets"]
        rows, cols = entry["shape"]
        # One map per tensor, dropped when done: its pages never add up to the checkpoint's size.
        matrix = np.memmap(file, dtype=self._DTYPES[kind], mode="r", offset=base + start, shape=(rows, cols))
        out = np.empty(rows, dtype=np.float64)
        try:
            for r in range(0, rows, ROW_BLOCK):
                block = matrix[r: r + ROW_BLOCK]
                if kind == "BF16":  # bfloat16 is the top half of a float32: exact
                    block = (block.astype(np.uint32) << 16).view(np.float32)
                out[r: r + ROW_BLOCK] = np.abs(block.astype(np.float64)).sum(axis=1)
        finally:
            del matrix
        return out


def _header(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + size])


# ---- applying it -------------------------------------------------------------------------------
def apply_permutation_(model: PreTrainedModel, arch: Arch, permutation: Permutation) -> PreTrainedModel:
    """Reorder ``model``'s MLP channels and head units in place by ``permutation``; the function the
    model computes is unchanged. Each index tensor is made on the device of the weight it indexes, so a
    replica spread over several GPUs is reordered where its layers live."""
    import torch
    from torch import nn

    permutation.check(arch)
    hd, g = arch.head_dim, arch.heads_per_unit

    def rows_(linear: nn.Linear, order: np.ndarray) -> None:
        index = torch.tensor(order, device=linear.weight.device)
        linear.weight.data = linear.weight.data[index].contiguous()
        if linear.bias is not None:
            linear.bias.data = linear.bias.data[torch.tensor(order, device=linear.bias.device)].contiguous()

    def columns_(linear: nn.Linear, order: np.ndarray) -> None:
        linear.weight.data = linear.weight.data[:, torch.tensor(order, device=linear.weight.device)].contiguous()

    with torch.no_grad():
        for i, module in enumerate(model.model.layers):
            mlp = getattr(module, "mlp", None)
            if isinstance(getattr(mlp, "gate_proj", None), nn.Linear):
                order = permutation.mlp[i]
                rows_(mlp.gate_proj, order)
                rows_(mlp.up_proj, order)
                columns_(mlp.down_proj, order)
            attn = getattr(module, "self_attn", None)
            if isinstance(getattr(attn, "q_proj", None), nn.Linear):
                units = permutation.units[i]
                q_rows = (units[:, None] * g * hd + np.arange(g * hd)).reshape(-1)
                kv_rows = (units[:, None] * hd + np.arange(hd)).reshape(-1)
                rows_(attn.q_proj, q_rows)
                rows_(attn.k_proj, kv_rows)
                rows_(attn.v_proj, kv_rows)
                columns_(attn.o_proj, q_rows)
    return model


def permutation_for(model: str, known: Permutation | None = None, kv_weight: str = "n_rep") -> Permutation:
    """The channel order of ``model``'s weights as they are now, with ``kv_weight``: ``known`` (a
    run's stored order) when it was computed from them with that weighting, else computed from the
    checkpoint (a run that stored the other weighting of a GQA model gets a new order, and a new tag).
    Runs where the weights are (a Ray worker), so the driver never reads a weight."""
    from .fingerprint import model_fingerprint
    from .models import read_model_config, resolve_model

    path = resolve_model(model)
    if (known is not None and known.checkpoint == model_fingerprint(path)
            and known.method == l1_method(Arch.from_hf_config(read_model_config(str(path))), kv_weight)):
        return known
    return checkpoint_permutation(path, kv_weight=kv_weight)
