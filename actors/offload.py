"""Refusing offloaded replicas, before any evaluation.

accelerate offloads the modules a device map sends to ``cpu`` or ``disk``: their weights wait on the
``meta`` device until the module's hook runs. rayprune's lean forward (``actors/forward.py``) reads
``.weight`` directly, so it would fail on them ("Cannot copy out of meta tensor"), or, on a replica
that computes on CUDA, mix a CPU weight into a GPU matmul. Rather than go through the hooks (one host
to device copy per module per candidate: slower than the search can bear), a replica refuses: right
after loading, :func:`check_not_offloaded` raises :class:`OffloadedReplica`, which names the
offloaded modules, the model's size in its dtype and how many GPUs of the replica's memory it needs
(:mod:`actors.sizing`). Before loading, :func:`check_fits` tells the driver the same from the
config alone.
"""

from __future__ import annotations

from typing import Any, Mapping

from search_spaces.memory import WorkingMemory, human_bytes

from .sizing import ReplicaSize, ReplicaTooLarge, Working, replica_size, weights_bytes

#: GPU memory assumed in a refusal's advice when the replica has no GPU to ask (an 80 GB A100/H100).
REFERENCE_GPU_BYTES = 80 * 10**9
#: The most GPUs a refusal's advice considers.
ADVICE_MAX_GPUS = 64


class OffloadedReplica(RuntimeError):
    """A replica was loaded with modules offloaded to ``cpu``/``disk``, which the lean forward cannot run."""


def offloaded_modules(model: Any) -> dict[str, str]:
    """Module -> where it went, for every module whose weights are not where the replica computes.

    That is every device-map entry on ``disk``, every ``cpu`` entry of a replica that computes on
    CUDA, and the owner of any parameter or buffer left on the ``meta`` device (empty: not offloaded).
    """
    mapping = getattr(model, "hf_device_map", None) or {}
    places = [str(v) for v in mapping.values()]
    on_gpu = any(p.isdigit() or p.startswith("cuda") for p in places)
    found = {name: str(place) for name, place in mapping.items()
             if str(place) == "disk" or (on_gpu and str(place) == "cpu")}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor.device.type == "meta":
            owner = name.rpartition(".")[0]
            if not any(owner == m or owner.startswith(m + ".") for m in found):
                found[owner] = "meta"
    return found


def check_not_offloaded(model: Any, *, gpu_bytes: int | None = None, working: Working | None = None) -> None:
    """Raise :class:`OffloadedReplica` if any module of the just-loaded ``model`` is offloaded.

    ``gpu_bytes``: the memory of one of the replica's GPUs (None: asked from CUDA, else
    :data:`REFERENCE_GPU_BYTES`); ``working``: the engine's working memory, counted in the advice.
    """
    found = offloaded_modules(model)
    if not found:
        return
    dtype = str(model.dtype).removeprefix("torch.")
    gpu_bytes = gpu_bytes or _gpu_bytes(model)
    config = model.config.to_dict()
    names = sorted(found)
    shown = ", ".join(f"{n or '(model)'} ({found[n]})" for n in names[:6]) + (
        f" and {len(names) - 6} more" if len(names) > 6 else "")
    raise OffloadedReplica(
        f"the replica loaded with modules offloaded to cpu/disk: {shown}. rayprune's lean forward reads "
        f"weights directly and does not run offloaded modules, so no mask was evaluated. "
        f"{advice(config, dtype, gpu_bytes, working)}")


def advice(config: Mapping[str, Any], dtype: str, gpu_bytes: int, working: Working | None = None) -> str:
    """What the model needs in ``dtype`` on GPUs of ``gpu_bytes``, and the settings that give it."""
    working = working or WorkingMemory(0, 0, 0)
    weights = weights_bytes(config, dtype)
    at_most = working(ADVICE_MAX_GPUS) if callable(working) else working
    gpus = f"GPUs of {gpu_bytes / 1e9:g} GB ({human_bytes(gpu_bytes)})"
    try:
        size = replica_size(config, dtype, gpu_bytes, working, max_gpus=ADVICE_MAX_GPUS)
    except ReplicaTooLarge:
        return (f"The model is {human_bytes(weights)} in {dtype} ({human_bytes(weights + at_most.total)} with its "
                f"working memory) and does not fit {ADVICE_MAX_GPUS} {gpus}: use larger GPUs or a 16-bit dtype "
                f"(dtype=bfloat16).")
    gpus = gpus if size.gpus > 1 else gpus.replace("GPUs", "GPU", 1)
    return (f"The model is {human_bytes(weights)} in {dtype} ({human_bytes(size.replica_bytes)} with its working "
            f"memory) and needs {size.gpus} {gpus} per replica (of one node); set cluster.gpus_per_actor: auto (or "
            f"cluster.gpus_per_actor={size.gpus}).")


def check_fits(config: Mapping[str, Any], dtype: str, gpus: int, gpu_bytes: int, working: Working) -> ReplicaSize:
    """Before loading: the size of a replica of ``config`` on ``gpus`` GPUs of ``gpu_bytes``.

    Raises :class:`ReplicaTooLarge` (saying how many GPUs it needs) when ``gpus`` do not hold the model
    and its working memory without offloading; returns the :class:`~actors.sizing.ReplicaSize` of the
    smallest k that does (k <= ``gpus``).
    """
    try:
        return replica_size(config, dtype, gpu_bytes, working, max_gpus=max(1, int(gpus)))
    except ReplicaTooLarge:
        raise ReplicaTooLarge(
            f"a replica on {gpus:g} GPU{'s' if gpus != 1 else ''} of {gpu_bytes / 1e9:g} GB would offload "
            f"weights to cpu/disk, which rayprune refuses. {advice(config, dtype, gpu_bytes, working)}") from None


def _gpu_bytes(model: Any) -> int:
    """Total memory of the first CUDA device the model sits on, else :data:`REFERENCE_GPU_BYTES`."""
    import torch

    for tensor in model.parameters():
        if tensor.device.type == "cuda":
            return int(torch.cuda.get_device_properties(tensor.device).total_memory)
    return REFERENCE_GPU_BYTES


__all__ = ["OffloadedReplica", "advice", "check_fits", "check_not_offloaded", "offloaded_modules"]
