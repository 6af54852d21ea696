"""Compact export: a physically smaller model that loads with stock transformers classes.

``export_compact`` writes the dense model's tensors in the run's channel order (``actors.permutation``:
the one the evaluators used, whatever the dtype) with the mask applied physically, streamed from the
checkpoint one tensor at a time (``actors.stream_export``: the dense model is never in memory), and
saves the tokenizer, ``pruning_config.json`` and a ``config.json`` whose ``rayprune`` entry records
the per-layer structure. ``compact_model`` makes the same model in memory (for ``rayprune eval``).
``load_pruned`` rebuilds that structure from the stock class (no ``trust_remote_code``, no patched
fork) on empty weights and loads the tensors into it, so a 70B export never materialises the dense
model on either side.

SPRINT's refitted ``down_proj`` weights (``tuned``) are written in place of the originals; the
``rayprune`` entry lists them by content hash, and ``load_pruned`` restores them with the rest.

An export replaces its output directory as a whole, so it only ever replaces what an export wrote:
every export carries the marker file ``rayprune-export.json`` (JSON ``{"format": 1}``), and
``check_export_target`` refuses a run directory, the source model, a directory holding either, and
any non-empty directory that is not an earlier export, before a weight is read. Each export writes
into its own staging directory ``.<name>.tmp-<pid>-<random>`` beside the output (a dot-dir: the URI
mirror skips it) and swaps it in by renames; a failure removes the staging directory and leaves the
previous output untouched.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from search_spaces import Arch, Mask, param_count
from search_spaces.pruning_config import mask_to_pruning_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .permutation import Permutation

FORMAT_VERSION = 1


class UnsafeExportTarget(ValueError):
    """The output directory is not one an export may replace (the message says why and what to do)."""


#: The marker file every export writes; its JSON names the layout of the directory. Not a dot-file:
#: the URI mirror skips those, and a pulled export must still be recognised as one.
MARKER = "rayprune-export.json"
MARKER_FORMAT = 1
#: What an export writes (besides ``*.safetensors``): all an older, unmarked export may hold.
EXPORT_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors.index.json", "pruning_config.json", MARKER,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
})
#: Any of these makes a directory a run directory, never to be replaced. A campaign writes its lock and
#: config.yaml first; the removal path (named by ``orchestrator.rundir`` alone) comes later, and a
#: directory holding it without these is still refused, as a non-empty directory that is not an export.
RUN_DIR_FILES = ("config.yaml", "evals", "calibration.parquet", ".lock")


def compact_model(model: str, mask: Mask, *, dtype: str = "float32",
                  tuned: Mapping[int, Any] | None = None, permutation: Permutation | None = None) -> PreTrainedModel:
    """The compact model of ``mask`` applied to ``model`` (a preset, directory or hub id), in memory,
    with the ``rayprune`` entry of its config filled in. It loads the dense model first: for uses that
    need the model in memory anyway (``rayprune eval``); an export streams instead (``export_compact``).

    ``tuned``: MLP layer -> refitted ``down_proj`` weight (``H x kept width``, numpy or torch, of the
    L1-reordered model, as SPRINT produces them); ValueError for a removed layer or a wrong shape.
    ``dtype``: ``float32``, ``bfloat16``, ``float16``, or ``auto``: the dtype the checkpoint is stored
    in (``actors.models.checkpoint_dtype``; fp32 when its config.json names none), never upcast.
    ``permutation``: the channel order the search scored with (a run's ``permutation.safetensors``);
    None: the checkpoint's own (``checkpoint_permutation``). The dtype never changes which channels
    a width keeps. BadPermutation if it was computed from other weights.
    """
    from .models import checkpoint_dtype, load_model, resolve_model
    from .permutation import apply_permutation_
    from .surgery import count_parameters, prune_model_

    source = resolve_model(model)
    permutation = _search_order(model, source, permutation)
    dense = load_model(source, dtype=checkpoint_dtype(model) if dtype == "auto" else dtype)
    arch = Arch.from_hf_config(dense.config.to_dict())
    pruned = prune_model_(apply_permutation_(dense, arch, permutation), mask, arch)
    tuned_ids = set_tuned_(pruned, mask, tuned or {})
    params = count_parameters(pruned)
    if params != param_count(mask, arch):
        raise RuntimeError(f"compact model has {params} parameters, the mask says {param_count(mask, arch)}")
    pruned.config.rayprune = _rayprune_entry(model, mask, permutation, params, tuned_ids)
    return pruned.eval()


def export_compact(model: str, mask: Mask, out_dir: str | os.PathLike[str], *, dtype: str = "float32",
                   tuned: Mapping[int, Any] | None = None, permutation: Permutation | None = None,
                   shard_bytes: int | None = None) -> Path:
    """Write the compact model of ``mask`` applied to ``model`` (the model ``compact_model`` makes, the
    same tensors bit for bit) to ``out_dir``; returns the output directory, resolved.

    The weights are streamed from the checkpoint's safetensors files one tensor at a time
    (``actors.stream_export``): the dense model is never in memory, so exporting 70B needs about
    1 GiB besides Python and torch, not 257. ``shard_bytes``: the largest output shard (None:
    ``stream_export.SHARD_BYTES``, 5 GB).

    ``dtype``, ``tuned`` and ``permutation`` as for ``compact_model``; every problem with them is a
    ValueError before anything is written. ``out_dir`` may not
    exist yet, be empty, or hold an earlier export (``check_export_target``,
    checked before any weight is read and again just before the swap); anything else is a
    ValueError and nothing is touched. A failure while writing raises OSError (ValueError from the
    checks) after removing the staging directory; the previous ``out_dir`` is then untouched.
    """
    from .models import checkpoint_dtype, load_tokenizer, read_model_config, resolve_model
    from .stream_export import SHARD_BYTES, plan_compact, write_compact

    out = output_path(out_dir)
    check_export_target(out, model)
    source = resolve_model(model)
    arch = Arch.from_hf_config(read_model_config(str(source)))
    permutation = _search_order(model, source, permutation)
    plan = plan_compact(source, mask, arch, dtype=checkpoint_dtype(model) if dtype == "auto" else dtype,
                        permutation=permutation, tuned=tuned)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        staging.mkdir(parents=True)  # not exist_ok: the name is this export's alone
        write_compact(plan, source, staging, shard_bytes=shard_bytes or SHARD_BYTES)
        _write_configs(staging, source, plan.dtype, plan.architecture,
                       _rayprune_entry(model, mask, permutation, plan.params, plan.tuned_ids))
        load_tokenizer(source).save_pretrained(staging)
        (staging / "pruning_config.json").write_text(json.dumps(mask_to_pruning_config(mask, arch), indent=2) + "\n")
        (staging / MARKER).write_text(json.dumps({"format": MARKER_FORMAT}) + "\n")
        check_export_target(out, model, source=source)  # the directory may have changed meanwhile
        _swap_in(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, UnsafeExportTarget) or not isinstance(exc, Exception):
            raise  # a refusal (it says what to do), or an interrupt
        raise OSError(_failure_message(out, exc)) from exc
    return out


def _search_order(model: str, source: Path, permutation: Permutation | None) -> Permutation:
    """``permutation`` (the checkpoint's own when None), refused if computed from other weights."""
    from .fingerprint import model_fingerprint
    from .permutation import checkpoint_permutation

    permutation = permutation or checkpoint_permutation(source)
    permutation.require_checkpoint(model_fingerprint(source), str(model))
    return permutation


def _rayprune_entry(model: str, mask: Mask, permutation: Permutation, params: int,
                    tuned_ids: Mapping[str, str]) -> dict[str, Any]:
    """The ``rayprune`` entry of an export's config.json: what ``load_pruned`` rebuilds it from."""
    entry = {"format": FORMAT_VERSION, "mask": mask.to_dict(), "reordered": permutation.tag,
             "params": params, "source": str(model)}
    if tuned_ids:
        entry["tuned"] = dict(tuned_ids)
    return entry


def _write_configs(staging: Path, source: Path, dtype: str, architecture: str, entry: dict[str, Any]) -> None:
    """config.json and generation_config.json as ``save_pretrained`` of the compact model writes them:
    the source's config with the weights' dtype, the class and the ``rayprune`` entry; the source's
    generation config, or the one transformers derives from its config.json when it has none."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    config.dtype = dtype
    config.architectures = [architecture]
    config.rayprune = entry
    config.save_pretrained(staging)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:  # what from_pretrained falls back to (transformers.generation.utils)
        generation = GenerationConfig.from_pretrained(source, config_file_name="config.json", _from_model_config=True)
    generation.save_pretrained(staging)


def output_path(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` resolved (symbolic links of its parents followed); ValueError for a link or ``/``."""
    out = Path(out_dir)
    if out.is_symlink():
        raise _refusal(out, "is a symbolic link (to " + os.readlink(out) + ")")
    out = out.resolve()
    if not out.name:
        raise _refusal(out, "is the root of the file system")
    return out


def check_export_target(out: Path, model: str, *, source: Path | None = None) -> None:
    """Refuse (ValueError naming ``out``, why, and the fix) any ``out`` an export may not replace.

    Allowed: a path that does not exist, an empty directory, a directory with the export marker, or
    an older export (config.json with a ``rayprune`` entry) holding nothing but files an export
    writes. Never a run directory, the source ``model`` (resolved with ``resolve_model`` unless
    ``source`` is given) or a directory holding either. Resolves the model only when ``out`` exists.
    """
    if out.is_symlink():
        raise _refusal(out, "is a symbolic link")
    if not out.exists():
        return
    if not out.is_dir():
        raise _refusal(out, "is a file, not a directory")
    if found := _run_dir_files(out):
        raise _refusal(out, f"is a run directory (it holds {', '.join(found)})")
    if source is None:
        from .models import resolve_model

        source = resolve_model(model)
    source = Path(source).resolve()
    if out.resolve() == source:
        raise _refusal(out, f"is the source model {model!r}")
    if out.resolve() in source.parents:
        raise _refusal(out, f"contains the source model {model!r} ({source})")
    entries = sorted(out.iterdir())
    if not entries:
        return
    dirs = [e for e in entries if e.is_dir()]
    for entry in dirs:
        if _run_dir_files(entry):
            raise _refusal(out, f"contains the run directory {entry}")
    if dirs:
        raise _refusal(out, f"holds the subdirectories {_names(dirs)}, which no export writes, so it is not an export")
    if _has_marker(out):
        return
    foreign = [e for e in entries if e.name not in EXPORT_FILES and not e.name.endswith(".safetensors")]
    if _has_rayprune_config(out) and not foreign:
        return  # an export written before the marker existed
    why = f"it holds {_names(foreign)}, which no export writes" if foreign else f"it has no {MARKER} marker"
    raise _refusal(out, f"is a non-empty directory that is not a rayprune export ({why})")


def _swap_in(staging: Path, out: Path) -> None:
    """Put the complete ``staging`` in place of ``out``: the previous ``out`` moves aside (a dot-dir),
    ``staging`` is renamed to ``out``, then the previous one is deleted. If the rename fails, the
    previous one goes back; if another export took the place meanwhile, its output is moved aside in turn."""
    for attempt in range(3):
        previous: Path | None = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.replace(out, previous)
        except FileNotFoundError:
            previous = None
        try:
            os.replace(staging, out)
        except OSError as exc:
            if previous is not None:
                if out.exists():  # another export's output is in place: ours was superseded anyway
                    shutil.rmtree(previous, ignore_errors=True)
                else:
                    os.replace(previous, out)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and attempt < 2:
                continue
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return


def _failure_message(out: Path, exc: BaseException) -> str:
    """One line for a failed write: where, why, what is left, what to do."""
    if isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    else:
        why = f"{type(exc).__name__}: {exc}"
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(
        s in str(exc) for s in ("No space left", "StorageFull", "os error 28"))
    left = f"the previous {out} is untouched" if out.exists() else f"nothing was written to {out}"
    fix = (f"free disk space on the file system of {out.parent}, or choose an --out on another disk, and export again"
           if full else "fix that and export again")
    return f"export to {out} failed: {why}; the partial export was removed and {left}; {fix}"


def _refusal(out: Path, why: str) -> UnsafeExportTarget:
    return UnsafeExportTarget(f"cannot export to {out}: it {why}, and an export replaces its output directory as a whole; "
                      f"choose a new --out (a directory that does not exist yet, an empty one, or an earlier export)")


def _run_dir_files(path: Path) -> list[str]:
    return [name for name in RUN_DIR_FILES if (path / name).exists()]


def _names(paths: list[Path], most: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _has_marker(path: Path) -> bool:
    """Whether ``path`` holds a readable export marker (``{"format": N}``)."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(marker, dict) and isinstance(marker.get("format"), int)


def _has_rayprune_config(path: Path) -> bool:
    """Whether ``path/config.json`` has the ``rayprune`` entry every export writes."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and isinstance(config.get("rayprune"), dict)


def set_tuned_(model: PreTrainedModel, mask: Mask, tuned: Mapping[int, Any]) -> dict[str, str]:
    """Put refitted down_proj weights into the pruned ``model``; returns layer -> content hash."""
    import torch

    from .stream_export import tuned_weights

    shapes = {f"model.layers.{layer}.mlp.down_proj.weight": tuple(model.model.layers[layer].mlp.down_proj.weight.shape)
              for layer in tuned if layer not in mask.mlp_removed}
    arrays, ids = tuned_weights(mask, tuned, shapes)
    for layer, array in arrays.items():
        down = model.model.layers[layer].mlp.down_proj
        down.weight = torch.nn.Parameter(torch.from_numpy(array.copy()).to(down.weight.dtype), requires_grad=False)
    return ids


def load_pruned(path: str | os.PathLike[str], *, device_map: str | dict[str, Any] | None = None) -> PreTrainedModel:
    """Load a compact export as a stock ``*ForCausalLM`` with its pruned structure."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .surgery import prune_model_

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    info = getattr(config, "rayprune", None)
    if not isinstance(info, dict) or "mask" not in info:
        raise ValueError(f"{path} is not a rayprune export (its config.json has no 'rayprune' entry); "
                         f"load a dense model with transformers, or export one with `rayprune export`")
    mask, arch = Mask.from_dict(info["mask"]), Arch.from_hf_config(config.to_dict())
    with init_empty_weights():  # parameters on the meta device, buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", trust_remote_code=False)
    prune_model_(model, mask, arch)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if arch.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: weights do not match the recorded structure "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if arch.tie_embeddings:
        model.tie_weights()
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        model = dispatch_model(model, infer_auto_device_map(model) if device_map == "auto" else device_map)
    return model.eval()
