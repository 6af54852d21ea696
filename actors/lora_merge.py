"""LoRA adapters of a compact model: which projections they can target, and merging them in.

A compact model (``actors.export``) is a stock ``*ForCausalLM`` whose removed blocks are gone:
``actors.surgery`` puts a ``RemovedAttention`` / ``RemovedMLP`` in their place, modules without a
single Linear. So a model whose every MLP was removed has no ``gate_proj``/``up_proj``/``down_proj``
at all, and peft would quietly adapt the rest (it only complains when *no* target matches).
:func:`check_targets` says so before training, from a live model or from ``config.json`` alone.
Narrowed projections are ordinary smaller Linears: LoRA adapts them at their own widths.

:func:`merge_adapter` folds an adapter saved by ``PeftModel.save_pretrained`` into the weights
(``W + (alpha / r) B A``, computed in fp32) and writes a compact export that
``actors.export.load_pruned`` loads like any other: the same ``rayprune`` entry (mask, parameter
count) plus a ``recovery`` entry naming the adapter. It writes into a staging directory beside the
output and renames it into place (``actors.export._swap_in``), and refuses the same output
directories an export refuses (``check_export_target``), the source model among them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from search_spaces import Arch, Mask

from .export import (EXPORT_FILES, MARKER, MARKER_FORMAT, UnsafeExportTarget, _failure_message, _refusal, _swap_in,
                     check_export_target, output_path)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

__all__ = ["ATTENTION_TARGETS", "MLP_TARGETS", "check_targets", "lora_targets", "merge_adapter"]

#: The Linear projections of one decoder layer in every family rayprune prunes (llama, mistral, qwen2).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
MERGE_DTYPES = ("float32", "bfloat16", "float16")
#: Files of the compact model an adapter merge writes anew (everything else an export holds is copied).
_WRITTEN = frozenset({"config.json", "model.safetensors.index.json", MARKER})


# ---- which projections a LoRA can target ------------------------------------------------------------------
def lora_targets(model: Any) -> set[str]:
    """The names (last path component) of the Linear projections in the decoder layers of ``model``:
    ``{"q_proj", ..., "down_proj"}`` for an unpruned model, without those of blocks removed in every layer.

    ``model``: a live model (a ``*ForCausalLM``, or a ``PeftModel`` of one: its adapted layers count by
    their own names), a ``PretrainedConfig``, a ``config.json`` dict, or a model directory / config.json
    path (nothing is loaded but that file; its ``rayprune`` entry says which blocks are gone). The LM
    head is never a target: it is tied to the embedding in many models, and a merge would untie it.
    """
    if hasattr(model, "named_modules"):
        return _module_targets(model)
    config = _config_dict(model)
    mask = Mask.from_dict(config["rayprune"]["mask"]) if isinstance(config.get("rayprune"), dict) else Mask()
    arch = Arch.from_hf_config(config)  # UnsupportedArchitecture for a family rayprune does not know
    layers = range(arch.num_layers)
    found: set[str] = set()
    if any(mask.heads_kept(layer, arch.num_head_units) for layer in layers):
        found.update(ATTENTION_TARGETS)
    if any(mask.mlp_kept(layer, arch.intermediate_size) for layer in layers):
        found.update(MLP_TARGETS)
    return found


def check_targets(model: Any, targets: Iterable[str] | str) -> set[str]:
    """ValueError naming every target of ``targets`` that ``model`` does not have, why, and the ones it
    has; returns the targets (all there). ``model`` as for :func:`lora_targets`. Call it before
    training: peft itself only fails when *no* target matches, and would quietly adapt the rest.
    A plain string is one module name (not peft's regular expression)."""
    wanted = [targets] if isinstance(targets, str) else list(dict.fromkeys(targets))
    available = lora_targets(model)
    missing = [t for t in wanted if t not in available]
    if not wanted:
        raise ValueError(f"no LoRA targets given; choose some of: {_listed(available)} (recovery.targets)")
    if missing:
        why = []
        gone = [t for t in missing if t in ATTENTION_TARGETS + MLP_TARGETS]
        if any(t in MLP_TARGETS for t in gone):
            why.append("every MLP block was removed by the pruning")
        if any(t in ATTENTION_TARGETS for t in gone):
            why.append("every attention block was removed by the pruning")
        if len(gone) < len(missing):
            why.append("a target is the name of a Linear projection in the decoder layers, such as q_proj")
        raise ValueError(f"LoRA target{'s' if len(missing) > 1 else ''} {_listed(missing)} not in the model "
                         f"({'; '.join(why)}); the model has {_listed(available) or 'no Linear projection left'}: "
                         f"set recovery.targets to some of those")
    return set(wanted)


def _module_targets(model: nn.Module) -> set[str]:
    """The projection names of a live model's decoder layers (a PeftModel's adapted ones by their own name)."""
    from torch import nn

    if hasattr(model, "get_base_model"):  # a PeftModel: the model with its adapted layers in place
        model = model.get_base_model()
    layers = model.model.layers
    found: set[str] = set()
    wrappers: list[str] = []  # peft's tuner layers: the Linear inside (base_layer, lora_A...) is not a target
    for name, module in layers.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            wrappers.append(name)
            found.add(name.rsplit(".", 1)[-1])
        elif isinstance(module, nn.Linear):
            found.add(name.rsplit(".", 1)[-1])
    return found


def _config_dict(config: Any) -> dict[str, Any]:
    """A config.json as a dict, from a dict, a ``PretrainedConfig``, a directory or a file path."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    path = Path(config)
    file = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config {file} ({exc}); give a model directory with a config.json") from None


def _in_layer_order(names: Iterable[str]) -> list[str]:
    """``names`` as a layer runs its projections (q, k, v, o, gate, up, down), anything else after."""
    order = {t: i for i, t in enumerate(ATTENTION_TARGETS + MLP_TARGETS)}
    return sorted(names, key=lambda t: (order.get(t, len(order)), t))


def _listed(names: Iterable[str]) -> str:
    return ", ".join(_in_layer_order(names))


# ---- merging an adapter into the compact model --------------------------------------------------------------
def merge_adapter(model_dir: str | os.PathLike[str], adapter_dir: str | os.PathLike[str],
                  out_dir: str | os.PathLike[str], *, dtype: str = "float32") -> Path:
    """Fold the LoRA adapter in ``adapter_dir`` into the compact model in ``model_dir`` and write the
    result to ``out_dir`` as a compact export (``load_pruned(out_dir)`` loads it); returns ``out_dir``, resolved.

    The merge is computed in fp32 (the model is loaded and upcast, the adapter is fp32), then cast to
    ``dtype`` (float32, bfloat16 or float16). ``config.json`` is ``model_dir``'s with the weights'
    dtype and, in its ``rayprune`` entry, ``recovery``: the adapter's r, alpha, dropout, targets and
    path (relative to ``out_dir`` when the adapter sits beside it, as in a run's ``recovery/``,
    else absolute), and the recovery it replaces, if ``model_dir`` was itself a merge. Tokenizer,
    generation and pruning config files are copied; a tied LM head stays tied.

    ValueError (nothing written) for a bad ``dtype``, an ``out_dir`` an export may not replace (the
    model, the adapter, a run directory...), a model that is not a compact export, or an adapter that
    does not fit the model (a module or shape it lacks, or parts beyond the decoder layers' LoRA).
    OSError if writing fails; the staging directory is removed and a previous ``out_dir`` is untouched.
    """
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"merge dtype {dtype!r} is not supported; use one of {', '.join(MERGE_DTYPES)}")
    source, adapter = Path(model_dir).resolve(), Path(adapter_dir).resolve()
    out = output_path(out_dir)
    _check_out(out, source, adapter)
    settings = _adapter_settings(adapter)
    merged = _merged_model(source, adapter, dtype)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["rayprune"] = _recovery_entry(config["rayprune"], settings, adapter, out)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        staging.mkdir(parents=True)  # not exist_ok: the name is this merge's alone
        _write_weights(merged, staging, tied=bool(config.get("tie_word_embeddings", False)))
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for file in sorted(source.iterdir()):
            if file.is_file() and file.name in EXPORT_FILES and file.name not in _WRITTEN:
                shutil.copy2(file, staging / file.name)
        (staging / MARKER).write_text(json.dumps({"format": MARKER_FORMAT}) + "\n")
        _check_out(out, source, adapter)  # the directory may have changed meanwhile
        _swap_in(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, UnsafeExportTarget) or not isinstance(exc, Exception):
            raise
        raise OSError(_failure_message(out, exc)) from exc
    return out


def _check_out(out: Path, source: Path, adapter: Path) -> None:
    """An export's refusals (``check_export_target``: the model, a run directory...), and the adapter."""
    if out == adapter or out in adapter.parents:
        raise _refusal(out, f"is or holds the adapter {adapter}")
    check_export_target(out, str(source), source=source)


def _adapter_settings(adapter: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter, checked to be one this merge handles."""
    file = adapter / "adapter_config.json"
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{adapter} is not a saved LoRA adapter ({file}: {exc}); give the directory "
                         f"PeftModel.save_pretrained wrote") from None
    if settings.get("peft_type") != "LORA":
        raise ValueError(f"{adapter} holds a {settings.get('peft_type')} adapter; only LoRA adapters are merged")
    extra = [k for k in ("modules_to_save", "trainable_token_indices") if settings.get(k)]
    if extra:
        raise ValueError(f"{adapter} also trains {', '.join(extra)} ({', '.join(str(settings[k]) for k in extra)}); "
                         f"rayprune merges LoRA adapters of the decoder layers' projections only")
    return settings


def _merged_model(source: Path, adapter: Path, dtype: str) -> PreTrainedModel:
    """The compact model in fp32 with the adapter merged in, cast to ``dtype``, checked."""
    import torch
    from peft import PeftModel

    from .export import load_pruned
    from .surgery import count_parameters

    base = load_pruned(source).float()
    tied = base.config.tie_word_embeddings
    params = base.config.rayprune["params"]
    try:
        with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = PeftModel.from_pretrained(base, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:  # a shape or module the compact model lacks
        raise ValueError(f"the adapter {adapter} does not fit the compact model {source}: {exc}; "
                         f"merge an adapter trained on this model") from None
    _check_adapted(peft_model, adapter)
    merged = peft_model.merge_and_unload()
    if tied and merged.lm_head.weight is not merged.model.embed_tokens.weight:
        raise ValueError(f"merging {adapter} untied the LM head from the embedding; merge an adapter of the "
                         f"decoder layers only")
    merged = merged.to(getattr(torch, dtype)).eval()
    if (count := count_parameters(merged)) != params:
        raise RuntimeError(f"merged model has {count} parameters, the compact model {params}")
    return merged


def _check_adapted(peft_model: Any, adapter: Path) -> None:
    """Every tensor of the saved adapter was loaded into a LoRA layer of a decoder layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    outside = [name for name, module in peft_model.get_base_model().named_modules()
               if isinstance(module, BaseTunerLayer) and not name.startswith("model.layers.")]
    if outside:
        raise ValueError(f"the adapter {adapter} adapts {', '.join(outside[:5])}, outside the decoder layers; "
                         f"rayprune merges LoRA adapters of the decoder layers' projections only")
    file = adapter / "adapter_model.safetensors"
    if not file.is_file():
        return  # a .bin adapter: peft loaded it, and the check below has no file to compare with
    saved = load_file(file)
    loaded = get_peft_model_state_dict(peft_model)
    unknown, untrained = sorted(set(saved) - set(loaded)), sorted(set(loaded) - set(saved))
    if unknown or untrained:
        what = (f"weights for modules the compact model does not have ({_few(unknown)})" if unknown else
                f"no weights for modules of the compact model it targets ({_few(untrained)})")
        raise ValueError(f"the adapter {adapter} has {what}: it was trained on another model; merge the "
                         f"adapter trained on this compact model")


def _few(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _recovery_entry(entry: dict[str, Any], settings: Mapping[str, Any], adapter: Path, out: Path) -> dict[str, Any]:
    """The ``rayprune`` entry of the merged model: ``entry`` with ``recovery`` naming the adapter."""
    targets = settings.get("target_modules")
    recovery: dict[str, Any] = {
        "method": "lora", "r": settings.get("r"), "alpha": settings.get("lora_alpha"),
        "dropout": settings.get("lora_dropout"),
        "targets": _in_layer_order(targets) if isinstance(targets, list) else targets,  # a str: peft's regex
        "adapter": os.path.relpath(adapter, out) if adapter.is_relative_to(out.parent) else str(adapter),
    }
    for key in ("rank_pattern", "alpha_pattern"):
        if settings.get(key):
            recovery[key] = settings[key]
    for key in ("use_rslora", "use_dora"):
        if settings.get(key):
            recovery[key] = True
    if isinstance(entry.get("recovery"), dict):
        recovery["previous"] = entry["recovery"]
    return {**entry, "recovery": recovery}


def _write_weights(model: PreTrainedModel, directory: Path, *, tied: bool) -> list[Path]:
    """The model's tensors as safetensors shards named as ``save_pretrained`` names them; a tied LM
    head is left out (``load_pruned`` ties it again), as every export leaves it out."""
    from safetensors.torch import save_file

    from .stream_export import INDEX_FILE, METADATA, SHARD_BYTES, SINGLE_FILE

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    written = []
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata=METADATA)
        written.append(directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(directory / INDEX_FILE)
    return written
