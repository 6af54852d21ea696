"""The tensors of a compact export, streamed from the checkpoint one at a time: no model in memory.

The in-memory route (``actors.export.compact_model``) loads the dense model, reorders it, slices it
and saves it: 257 GiB of fp32 for Llama-2-70B on whatever machine exports. This module writes the
same tensors without ever holding more than one of them:

1. :func:`plan_compact` reads only headers and config. The names and shapes of the output are those
   of the stock class built on the meta device from the source config and pruned with
   ``actors.surgery.prune_model_`` (exactly what ``actors.export.load_pruned`` rebuilds, so the two
   always agree; a tied LM head is left out, as ``save_pretrained`` leaves it out). For each output
   tensor the plan names its source tensor and which rows or columns it keeps, in the run's channel
   order: q/k/v rows and o_proj columns of the first kept head units, gate/up rows and down_proj
   columns of the first kept MLP channels (``actors.permutation`` orders them, ``actors.surgery``
   keeps the first ones: the plan does both with one index). SPRINT's refitted ``down_proj``
   weights take the place of their source tensor. Every mismatch is a ValueError before a byte is
   written.
2. :func:`write_compact` writes the planned tensors into safetensors shards of at most
   :data:`SHARD_BYTES` (a single tensor larger than that gets a shard of its own), named like
   ``save_pretrained``'s (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` with a
   ``model.safetensors.index.json``). Each shard's header is known from the plan, so it is written
   first and each tensor's bytes follow as soon as they exist: read from the source shard with
   plain reads (no memory map, whose touched pages would count as the process's own), indexed,
   cast with ``.to(dtype)`` (what ``load_model(dtype=...)`` does), written, dropped.

Peak memory above Python and torch is therefore two copies of the largest tensor at most (the one
read and its reordered or cast copy). Llama-2-70B stored in bf16: ``embed_tokens`` (32000 x 8192)
is 500 MiB, read and written as is; a ``gate_proj`` (28672 x 8192) is 448 MiB plus its reordered
copy: about 0.9 GiB in all, against 128 GiB for the model in bf16 and 257 GiB in the fp32 the
in-memory route loaded. Exported in fp32, the cast copy is twice as large: 500 + 1000 MiB for the
embeddings, 1.5 GiB. Measured on SmolLM2-135M in fp32: 118 MiB above the baseline (its embeddings
are 108 MiB), against 908 MiB for the in-memory route. The tensors equal the in-memory export's
bit for bit in every dtype (tests/actors/test_stream_export.py compares them).
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from search_spaces import Arch, Mask, param_count

if TYPE_CHECKING:
    import torch

    from .permutation import Permutation

#: The largest output shard in bytes (as the hub's customary ``5GB``); it bounds file sizes, not
#: memory, which holds one tensor at a time whatever the shard size.
SHARD_BYTES = 5 * 10**9
#: What ``save_pretrained`` writes into every safetensors header.
METADATA = {"format": "pt"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: safetensors dtype code -> (torch dtype name, bytes per element), for the dtypes rayprune reads.
_CODES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F64": ("float64", 8)}
_CODE_OF = {name: code for code, (name, _) in _CODES.items()}
_PROJECTION = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")


@dataclass(frozen=True, eq=False)
class OutputTensor:
    """One tensor of the export: ``source`` in the checkpoint, its ``rows`` then ``columns`` kept
    (None: all, in order), or the refitted weight ``tuned`` (float32, already of ``shape``) instead."""

    name: str
    shape: tuple[int, ...]
    source: str
    rows: np.ndarray | None = None
    columns: np.ndarray | None = None
    tuned: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class CompactPlan:
    """Everything an export writes about its weights, known before one of them is read."""

    tensors: tuple[OutputTensor, ...]
    dtype: str  # float32, bfloat16 or float16: every output tensor's
    architecture: str  # the stock class, for config.json's ``architectures``
    params: int  # tied embeddings counted once
    tuned_ids: dict[str, str]  # MLP layer -> content hash of its refitted down_proj

    def nbytes(self, tensor: OutputTensor) -> int:
        return int(np.prod(tensor.shape, dtype=np.int64)) * _itemsize(self.dtype)


class CheckpointTensors:
    """The tensors of a directory of safetensors files, read one at a time with plain reads.

    Reads ``model.safetensors.index.json`` when present (its ``weight_map`` names the files), else
    every ``*.safetensors`` file; a tensor named in two files is an error (which one is the model's?).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({path / name for name in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.safetensors file to export from")
        self.path = path
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for file in files:
            header, base = read_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise ValueError(f"{path}: tensor {name} is in both {self._where[name][0].name} and {file.name}; "
                                     f"remove the stale file (or give a {INDEX_FILE} naming the right one)")
                self._where[name] = (file, entry, base)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, in memory of its own (the file is not mapped)."""
        import torch

        file, entry, base = self._where[name]
        code = entry["dtype"]
        if code not in _CODES:
            raise ValueError(f"{file.name}: {name} is stored as {code}; rayprune exports F32, F16, BF16 or F64 "
                             f"checkpoints (dequantize the model first)")
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(file, "rb") as handle:
            handle.seek(base + start)
            if handle.readinto(buffer.numpy()) != end - start:
                raise OSError(f"{file} is truncated: {name} ends past the end of the file; download it again")
        return buffer.view(getattr(torch, _CODES[code][0])).reshape(entry["shape"])


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of safetensors ``file`` and the offset where its data begins."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its header size)")
        (size,) = struct.unpack("<Q", prefix)
        header = json.loads(handle.read(size))
    return header, 8 + size


def plan_compact(source: str | os.PathLike[str], mask: Mask, arch: Arch, *, dtype: str,
                 permutation: Permutation, tuned: Mapping[int, Any] | None = None) -> CompactPlan:
    """What the export of ``mask`` applied to checkpoint directory ``source`` writes, checked.

    ``dtype``: float32, bfloat16 or float16 (``auto`` is the caller's to resolve). ``permutation``:
    the channel order the search scored with (checked against ``arch``). ``tuned``: MLP layer ->
    refitted down_proj (``H x kept width``, numpy or torch). ValueError for a refit of a removed
    layer or of the wrong shape, a checkpoint tensor that is missing or of another shape than the
    config says; RuntimeError if the parameters do not add up to the mask's count.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"export dtype {dtype!r} is not supported; use float32, bfloat16 or float16 (or auto)")
    permutation.check(arch)
    shapes, architecture = compact_shapes(source, mask, arch)
    checkpoint = CheckpointTensors(source)
    tuned_arrays, tuned_ids = tuned_weights(mask, tuned or {}, shapes)
    tensors = []
    for name, shape in shapes.items():
        if name not in checkpoint:
            raise ValueError(f"{source}: the checkpoint has no tensor {name}, which {architecture} needs; "
                             f"is it a complete Llama, Qwen2 or Mistral checkpoint?")
        rows, columns, layer = _kept(name, mask, arch, permutation)
        if layer is not None and layer in tuned_arrays:
            tensors.append(OutputTensor(name, shape, name, tuned=tuned_arrays[layer]))
            continue
        got = list(checkpoint.shape(name))
        if rows is not None and got:
            got[0] = len(rows)
        if columns is not None and len(got) == 2:
            got[1] = len(columns)
        if tuple(got) != shape:
            raise ValueError(f"{source}: {name} has shape {checkpoint.shape(name)}, which gives {tuple(got)} after "
                             f"pruning where the config's structure needs {shape}; the config does not describe "
                             f"these weights")
        tensors.append(OutputTensor(name, shape, name, rows, columns))
    params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors)
    if params != param_count(mask, arch):
        raise RuntimeError(f"compact model has {params} parameters, the mask says {param_count(mask, arch)}")
    return CompactPlan(tuple(tensors), dtype, architecture, params, tuned_ids)


def compact_shapes(source: str | os.PathLike[str], mask: Mask, arch: Arch) -> tuple[dict[str, tuple[int, ...]], str]:
    """Output tensor name -> shape, in ``save_pretrained``'s order, and the stock class name: the
    class built from ``source``'s config on the meta device (no memory) and pruned by ``mask``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .surgery import prune_model_

    config = AutoConfig.from_pretrained(Path(source), trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", trust_remote_code=False)
    prune_model_(model, mask, arch)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if arch.tie_embeddings:
        shapes.pop("lm_head.weight", None)  # the embedding's alias: save_pretrained leaves it out too
    return shapes, type(model).__name__


def tuned_weights(mask: Mask, tuned: Mapping[int, Any],
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """Refitted down_proj weights as contiguous float32 arrays by layer, and layer -> content hash.

    ValueError for a layer the mask removes, or (with ``shapes``, the compact model's) a weight whose
    shape is not the pruned ``down_proj``'s."""
    from search_spaces.sprint import tensor_key

    arrays, ids = {}, {}
    for layer, weight in sorted(tuned.items()):
        if layer in mask.mlp_removed:
            raise ValueError(f"refitted weights given for MLP {layer}, which the mask removes; drop them")
        array = np.ascontiguousarray(np.asarray(weight.cpu() if hasattr(weight, "cpu") else weight, np.float32))
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        if shapes is not None and tuple(array.shape) != shapes.get(name):
            raise ValueError(f"refitted down_proj of layer {layer} has shape {array.shape}, the pruned layer "
                             f"{shapes.get(name)}; they must come from the same mask")
        arrays[layer] = array
        ids[str(layer)] = tensor_key(array.shape, "float32", array.tobytes())
    return arrays, ids


def _kept(name: str, mask: Mask, arch: Arch, permutation: Permutation
          ) -> tuple[np.ndarray | None, np.ndarray | None, int | None]:
    """(rows, columns) of source tensor ``name`` the export keeps, in order, and the MLP layer whose
    refit may replace it (down_proj weights only). A projection is always indexed, even at full
    width: its channels are reordered as the evaluators reordered theirs."""
    match = _PROJECTION.match(name)
    if not match:
        return None, None, None
    layer, proj, kind = int(match.group(1)), match.group(2), match.group(3)
    if proj in ("gate", "up", "down"):
        channels = permutation.mlp[layer][: mask.mlp_kept(layer, arch.intermediate_size)]
        if proj == "down":
            return (None, channels, layer) if kind == "weight" else (None, None, None)
        return channels, None, None
    hd, g = arch.head_dim, arch.heads_per_unit
    units = permutation.units[layer][: mask.heads_kept(layer, arch.num_head_units)]
    q_rows = (units[:, None] * g * hd + np.arange(g * hd)).reshape(-1)
    if proj == "q":
        return q_rows, None, None
    if proj in ("k", "v"):
        return (units[:, None] * hd + np.arange(hd)).reshape(-1), None, None
    return (None, q_rows, None) if kind == "weight" else (None, None, None)  # o_proj: its bias is not per head


def write_compact(plan: CompactPlan, source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write ``plan``'s tensors from checkpoint directory ``source`` into ``out_dir`` (which exists),
    one tensor in memory at a time; returns the files written (shards, then the index if any)."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; export on a little-endian machine")
    out_dir = Path(out_dir)
    shards = _shards(plan, shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    checkpoint = CheckpointTensors(source)
    written = []
    for name, shard in zip(names, shards):
        written.append(_write_shard(out_dir / name, shard, plan, checkpoint))
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": plan.params, "total_size": sum(map(plan.nbytes, plan.tensors))},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(out_dir / INDEX_FILE)
    return written


def _shards(plan: CompactPlan, shard_bytes: int) -> list[list[OutputTensor]]:
    """The tensors in order, cut into runs of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in plan.tensors:
        nbytes = plan.nbytes(tensor)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: list[OutputTensor], plan: CompactPlan, checkpoint: CheckpointTensors) -> Path:
    """One safetensors file: the header (offsets from the plan), then each tensor's bytes as made."""
    import torch

    header: dict[str, Any] = {"__metadata__": METADATA}
    offset = 0
    for tensor in tensors:
        end = offset + plan.nbytes(tensor)
        header[tensor.name] = {"dtype": _CODE_OF[plan.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the safetensors writer pads it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for tensor in tensors:
            data = make_tensor(tensor, plan.dtype, checkpoint)
            if tuple(data.shape) != tensor.shape:  # the plan checked shapes: this is a bug, not bad input
                raise RuntimeError(f"{tensor.name} came out {tuple(data.shape)}, planned {tensor.shape}")
            handle.write(data.reshape(-1).view(torch.uint8).numpy())
            del data
    if (size := path.stat().st_size) != 8 + len(encoded) + offset:
        raise OSError(f"{path} has {size} bytes, {8 + len(encoded) + offset} were written")
    return path


def make_tensor(tensor: OutputTensor, dtype: str, checkpoint: CheckpointTensors) -> torch.Tensor:
    """Output ``tensor`` in ``dtype``, contiguous: read, reordered and sliced in the stored dtype
    (exact), then cast with ``.to`` as ``load_model(dtype=...)`` casts the dense model."""
    import torch

    if tensor.tuned is not None:
        return torch.from_numpy(tensor.tuned).to(getattr(torch, dtype)).contiguous()
    data = checkpoint.read(tensor.source)
    if tensor.rows is not None:
        data = data.index_select(0, torch.tensor(np.asarray(tensor.rows, dtype=np.int64)))
    if tensor.columns is not None:
        data = data.index_select(1, torch.tensor(np.asarray(tensor.columns, dtype=np.int64)))
    return data.to(getattr(torch, dtype)).contiguous()


def _itemsize(dtype: str) -> int:
    return _CODES[_CODE_OF[dtype]][1]
