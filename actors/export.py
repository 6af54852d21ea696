"""Compact export: a physically smaller model that loads with stock transformers classes.

``export_compact`` reorders the dense model (L1, as the evaluators do), applies the mask physically
and saves safetensors, the tokenizer, ``pruning_config.json`` and a ``config.json`` whose
``rayprune`` entry records the per-layer structure. ``load_pruned`` rebuilds that structure from the
stock class (no ``trust_remote_code``, no patched fork) on empty weights and loads the tensors into
it, so a 70B export never materialises the dense model.

SPRINT's refitted ``down_proj`` weights (``tuned``) are written in place of the originals; the
``rayprune`` entry lists them by content hash, and ``load_pruned`` restores them with the rest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from search_spaces import Arch, Mask, param_count
from search_spaces.pruning_config import mask_to_pruning_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FORMAT_VERSION = 1


def compact_model(model: str, mask: Mask, *, dtype: str = "float32",
                  tuned: Mapping[int, Any] | None = None) -> PreTrainedModel:
    """The compact model of ``mask`` applied to ``model`` (a preset, directory or hub id), in memory,
    with the ``rayprune`` entry of its config filled in.

    ``tuned``: MLP layer -> refitted ``down_proj`` weight (``H x kept width``, numpy or torch, of the
    L1-reordered model, as SPRINT produces them); ValueError for a removed layer or a wrong shape.
    """
    from .models import load_model, resolve_model
    from .surgery import count_parameters, prune_model_, reorder_by_l1_

    dense = load_model(resolve_model(model), dtype=dtype)
    arch = Arch.from_hf_config(dense.config.to_dict())
    pruned = prune_model_(reorder_by_l1_(dense, arch), mask, arch)
    tuned_ids = set_tuned_(pruned, mask, tuned or {})
    params = count_parameters(pruned)
    if params != param_count(mask, arch):
        raise RuntimeError(f"compact model has {params} parameters, the mask says {param_count(mask, arch)}")
    pruned.config.rayprune = {"format": FORMAT_VERSION, "mask": mask.to_dict(), "reordered": "l1",
                              "params": params, "source": str(model)}
    if tuned_ids:
        pruned.config.rayprune["tuned"] = tuned_ids
    return pruned.eval()


def export_compact(model: str, mask: Mask, out_dir: str | os.PathLike[str], *, dtype: str = "float32",
                   tuned: Mapping[int, Any] | None = None) -> Path:
    """Write the compact model of ``mask`` applied to ``model`` (see ``compact_model``) to ``out_dir``."""
    from .models import load_tokenizer, read_model_config, resolve_model

    pruned = compact_model(model, mask, dtype=dtype, tuned=tuned)
    arch = Arch.from_hf_config(read_model_config(model))
    out = Path(out_dir)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pruned.save_pretrained(staging)
    load_tokenizer(resolve_model(model)).save_pretrained(staging)
    (staging / "pruning_config.json").write_text(json.dumps(mask_to_pruning_config(mask, arch), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def set_tuned_(model: PreTrainedModel, mask: Mask, tuned: Mapping[int, Any]) -> dict[str, str]:
    """Put refitted down_proj weights into the pruned ``model``; returns layer -> content hash."""
    import numpy as np
    import torch

    from search_spaces.sprint import tensor_key

    ids = {}
    for layer, weight in sorted(tuned.items()):
        if layer in mask.mlp_removed:
            raise ValueError(f"refitted weights given for MLP {layer}, which the mask removes; drop them")
        array = np.ascontiguousarray(np.asarray(weight.cpu() if torch.is_tensor(weight) else weight, np.float32))
        down = model.model.layers[layer].mlp.down_proj
        if tuple(array.shape) != tuple(down.weight.shape):
            raise ValueError(f"refitted down_proj of layer {layer} has shape {array.shape}, the pruned layer "
                             f"{tuple(down.weight.shape)}; they must come from the same mask")
        down.weight = torch.nn.Parameter(torch.from_numpy(array.copy()).to(down.weight.dtype), requires_grad=False)
        ids[str(layer)] = tensor_key(array.shape, "float32", array.tobytes())
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
