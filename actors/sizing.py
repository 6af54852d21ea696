"""How many GPUs one replica needs: accelerate's device map on the meta device, working memory kept back.

No weights are loaded: the model is built from its ``config.json`` under
``accelerate.init_empty_weights`` (Llama-2-70B: about 2 s and a few hundred MB of RAM) and sized with
``accelerate.utils.compute_module_sizes`` in the chosen dtype.

The rule (:func:`replica_size`). For k = 1, 2, ... up to ``max_gpus``, each of k GPUs of ``gpu_bytes``
keeps back

* :data:`MARGIN_BYTES` (the CUDA context, cuBLAS workspaces, allocator fragmentation);
* the working memory any GPU may need (:attr:`~search_spaces.memory.WorkingMemory.anywhere`: block
  temporaries, the loss chunk, SPRINT's refits);
* its share of the working memory that follows the layers (kept streams, SPRINT's checkpoints):
  ``per_layer x (L / k + 1)``, one layer of slack because layers do not split evenly;

and accelerate places the weights in the rest, as transformers' ``device_map="auto"`` does given
that ``max_memory``: ``get_balanced_memory``, then ``infer_auto_device_map`` with
``no_split_module_classes=model._no_split_modules``. k is the first whose map has no ``cpu`` or
``disk`` entry and where every GPU's weights, plus the working memory of the layers it actually got,
the shared working memory and the margin, fit in ``gpu_bytes``. Loading the replica with that map
(:attr:`ReplicaSize.device_map`) gives it exactly this layout.

torch, transformers and accelerate are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Union

from search_spaces import Arch
from search_spaces.memory import GIB, WorkingMemory, dtype_bytes, human_bytes

#: Kept back on every GPU for the CUDA context, cuBLAS workspaces and allocator fragmentation.
MARGIN_BYTES = 2 * GIB
#: The most GPUs of one node a replica may span (a replica never crosses nodes).
MAX_GPUS = 8
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


#: The working memory of a replica, or a function of its GPU count k (SPRINT: what stays on the device
#: depends on the memory budget of k GPUs, see :func:`sprint_checkpoint_budget`).
Working = Union[WorkingMemory, Callable[[int], WorkingMemory]]


class ReplicaTooLarge(ValueError):
    """The model plus its working memory does not fit the GPUs a replica may have."""


@dataclass(frozen=True)
class ReplicaSize:
    """k GPUs per replica and what each holds, from accelerate's device map on the meta device."""

    gpus: int  # k
    gpu_bytes: int  # memory of one GPU
    dtype: str
    weights_bytes: int  # the whole model in ``dtype`` (compute_module_sizes)
    working: WorkingMemory
    weights_per_gpu: tuple[int, ...]  # from the device map
    layers_per_gpu: tuple[int, ...]
    device_map: dict[str, int]  # module name -> GPU index (0..k-1): load the replica with it

    @property
    def working_per_gpu(self) -> tuple[int, ...]:
        """Working memory per GPU: the shared part plus that of the layers it holds."""
        return tuple(int(self.working.anywhere + n * self.working.per_layer) for n in self.layers_per_gpu)

    @property
    def need_per_gpu(self) -> tuple[int, ...]:
        """Weights + working memory + :data:`MARGIN_BYTES` on each GPU (each <= ``gpu_bytes``)."""
        return tuple(w + m + MARGIN_BYTES for w, m in zip(self.weights_per_gpu, self.working_per_gpu))

    @property
    def replica_bytes(self) -> int:
        """The replica's memory: its weights and its working memory (margins not counted)."""
        return self.weights_bytes + self.working.total

    def describe(self) -> str:
        """Lines for ``rayprune plan``: k, weights and working memory per GPU, the replica's total."""
        per_gpu = ", ".join(f"GPU {i}: {human_bytes(w)} weights ({n} layers) + {human_bytes(m)} working"
                            for i, (w, n, m) in enumerate(zip(self.weights_per_gpu, self.layers_per_gpu,
                                                              self.working_per_gpu)))
        return "\n".join([
            f"replica: {self.gpus} GPU{'s' if self.gpus > 1 else ''} of {self.gpu_bytes / 1e9:g} GB "
            f"({human_bytes(self.gpu_bytes)}) in {self.dtype}",
            f"  weights {human_bytes(self.weights_bytes)} ({self.weights_bytes:,} bytes); working memory "
            f"{self.working.describe()}",
            f"  per replica {human_bytes(self.replica_bytes)} (weights + working memory); per GPU, with "
            f"{human_bytes(MARGIN_BYTES)} margin each: {', '.join(human_bytes(n) for n in self.need_per_gpu)} "
            f"of {human_bytes(self.gpu_bytes)}",
            f"  accelerate's device map: {per_gpu}",
        ])


def torch_dtype(dtype: str) -> Any:
    """The torch dtype a GPU replica loads in for the ``dtype`` setting (``auto``: bfloat16, 2 bytes
    like the float16 of GPUs without bf16, so the sizes are the same)."""
    import torch

    return torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)


def meta_model(config: Mapping[str, Any], dtype: str) -> Any:
    """The causal LM of ``config`` (a ``config.json`` dict) on the meta device, in ``dtype``: no weights."""
    return _meta_model(json.dumps(dict(config), sort_keys=True, default=str), dtype)


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str, dtype: str) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(config_json)
    config.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(dtype))


def weights_bytes(config: Mapping[str, Any], dtype: str) -> int:
    """The model's weights and buffers in ``dtype``, in bytes (accelerate's ``compute_module_sizes``)."""
    from accelerate.utils import compute_module_sizes

    return int(compute_module_sizes(meta_model(config, dtype), dtype=torch_dtype(dtype))[""])


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns that the GPUs of a ``max_memory`` are not visible: on the driver they never are."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def device_map(model: Any, max_memory: Mapping[int, int], dtype: str) -> dict[str, int | str]:
    """accelerate's device map of ``model`` over ``max_memory`` (GPU index -> bytes), as
    ``device_map="auto"`` computes it: balanced over the GPUs, whole decoder layers; what does not
    fit goes to ``disk``."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = sorted(model._no_split_modules or [])
    with _quiet_accelerate():
        balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                       dtype=torch_dtype(dtype))
        return dict(infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split,
                                          dtype=torch_dtype(dtype)))


def device_of(name: str, mapping: Mapping[str, Any]) -> Any:
    """The device ``mapping`` gives module ``name`` (its own entry or its nearest parent's)."""
    while True:
        if name in mapping:
            return mapping[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def replica_size(config: Mapping[str, Any], dtype: str, gpu_bytes: int, working: Working, *,
                 max_gpus: int = MAX_GPUS) -> ReplicaSize:
    """The smallest k GPUs of ``gpu_bytes`` that hold the model and ``working`` (the module docstring's
    rule; ``working`` may be a function of k). :class:`ReplicaTooLarge` if even ``max_gpus`` do not,
    saying what the model needs."""
    from accelerate.utils import compute_module_sizes

    model = meta_model(config, dtype)
    sizes = compute_module_sizes(model, dtype=torch_dtype(dtype))
    layer_names = [n for n, _ in model.named_modules() if _LAYER.search(n)]
    L = len(layer_names)
    at = working if callable(working) else (lambda k: working)
    for k in range(1, max_gpus + 1):
        working = at(k)
        keep_back = MARGIN_BYTES + working.anywhere + working.per_layer * (L / k + 1)
        if keep_back >= gpu_bytes:
            continue
        mapping = device_map(model, {i: int(gpu_bytes - keep_back) for i in range(k)}, dtype)
        if any(not isinstance(d, int) for d in mapping.values()):  # cpu / disk: it does not fit
            continue
        weights = tuple(sum(sizes[n] for n, d in mapping.items() if d == i) for i in range(k))
        layers = tuple(sum(1 for n in layer_names if device_of(n, mapping) == i) for i in range(k))
        size = ReplicaSize(k, int(gpu_bytes), dtype, int(sizes[""]), working, weights, layers, mapping)
        if all(n <= gpu_bytes for n in size.need_per_gpu):
            return size
    working = at(max_gpus)
    need = sizes[""] + working.total
    raise ReplicaTooLarge(
        f"the model needs {human_bytes(need)} in {dtype} ({human_bytes(sizes[''])} weights + working memory "
        f"{working.describe()}) and does not fit {max_gpus} GPUs of "
        f"{gpu_bytes / 1e9:g} GB ({human_bytes(gpu_bytes)}) with {human_bytes(MARGIN_BYTES)} kept back on each; use "
        f"larger GPUs or a 16-bit dtype (dtype=bfloat16), or shrink the working memory: search.batch_size "
        f"(kept streams), data.calibration sequences and length (SPRINT checkpoints), search.sprint.top_k "
        f"(SPRINT refits)")


def working_for(config: Mapping[str, Any], dtype: str, *, batch_size: int, tokens: int, **sprint: Any) -> WorkingMemory:
    """:func:`search_spaces.memory.working_memory` of a GPU replica of ``config`` (one candidate stream),
    with SPRINT's store cap from :data:`actors.sprint.STORE_BYTES` when ``sprint=True`` is given."""
    from search_spaces.memory import working_memory

    if sprint.get("sprint"):
        from .sprint import STORE_BYTES

        sprint.setdefault("store_bytes", STORE_BYTES)
    return working_memory(Arch.from_hf_config(config), batch_size=batch_size, tokens=tokens,
                          element_bytes=dtype_bytes(dtype, on_gpu=True), streams=1, **sprint)


def sprint_checkpoint_budget(config: Mapping[str, Any], dtype: str, gpu_bytes: int, gpus: int) -> int:
    """The device bytes SPRINT's checkpoints may keep on a replica of ``gpus`` GPUs of ``gpu_bytes``
    before they move to host memory: the default budget of :mod:`actors.memory`
    (``DEFAULT_FRACTION`` of what the GPUs hold besides the weights)."""
    from .memory import DEFAULT_FRACTION

    return int(DEFAULT_FRACTION * max(0, gpus * gpu_bytes - weights_bytes(config, dtype)))
