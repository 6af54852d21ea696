"""Multi-GPU device emulation on a CPU: prove device-correctness without a GPU (SPEC section 8).

Every tensor really lives in CPU memory; the harness gives some of them a *fake* device identity
(``"cuda:0"``, ``"cuda:1"``, ...) and raises, as CUDA does, when an operation combines two devices.

Design: one ``torch.overrides.TorchFunctionMode`` (:class:`DeviceEmulation`) sees every torch call
made from Python (functions, tensor methods, ``nn.functional``, factory functions and even the
``tensor.device`` getter). The fake device is recorded per **storage** (a weak-keyed registry of
``UntypedStorage`` objects, which torch preserves as long as the storage lives), so views, ``.data``,
``nn.Parameter(t)`` and tied weights share the device of the memory they use, as on a real GPU.

Rules:

1. A tensor whose storage is not registered is on the (real) CPU.
2. ``t.device`` / ``t.is_cuda`` / ``t.get_device()`` report the fake device: ``torch.device("cuda", i)``
   (creating such an object works without CUDA), so code like ``h.to(layer.weight.device)`` moves.
3. Moves: ``.to(device | tensor | device=...)``, ``.cuda(i)``, ``.cpu()`` give a tensor on the target
   device (a copy when the device changes, the same tensor when it does not). ``copy_`` and setting
   ``.data`` may cross devices, as in torch.
4. Factories given ``device=<fake cuda>`` (``arange``, ``zeros``, ``tensor``, ``new_zeros``, ...) are
   run on the CPU and the result is registered on that device.
5. Any other call collects its tensor arguments (nested in lists/tuples/dicts too). Ignoring 0-dim
   CPU tensors (and Python scalars), they must all be on one device, else
   ``RuntimeError("Expected all tensors to be on the same device, but found at least two devices,
   cuda:0 and cuda:1!")``. Fresh outputs are registered on that device (views already are).
   Stricter than CUDA on one point: a CPU index tensor indexing a CUDA tensor (``x[idx]``) raises,
   because SPEC 8 says index tensors live where the indexed tensor lives (CUDA accepts it at the cost
   of a host-to-device copy per call).
6. ``t.numpy()`` of a tensor on a fake CUDA device raises ``TypeError`` as CUDA does.
7. Integer devices are GPUs, as on a CUDA build (``torch.device(1)``, ``.to(0)``, ``module.to(0)``):
   accelerate and transformers write device maps that way, so their real loaders and
   ``dispatch_model`` hooks run under the emulation (with ``torch.cuda`` queries patched by the test).
8. The mode is per thread (as torch function modes are): while :func:`emulate` is active, callables
   submitted to a ``concurrent.futures.ThreadPoolExecutor`` run under the same emulation.
9. Autograd's engine runs in C++, unseen: a gradient read through ``.grad`` is put on its tensor's
   device, where CUDA's autograd accumulates it; and torch's foreach grouping (AdamW,
   ``clip_grad_norm_``), also C++, is replaced by one that groups by the emulated devices.

``place()`` puts a tiny model on emulated devices the way accelerate's ``device_map="auto"`` does:
each module of the map is registered on its device and gets a forward pre-hook that moves its tensor
arguments there (accelerate's ``AlignDevicesHook``); a tied LM head shares the embedding's device
(its storage *is* the embedding's), while the final norm and rotary embedding sit on the last device.
Calls made inside torch functions implemented in Python are not seen one by one (the mode is off
while a call it intercepted runs), only the call as a whole.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DeviceEmulation", "emulate", "device_of", "place", "device_map", "emulated_model", "mixes"]

_STATE: dict[str, Any] = {"registry": None}

_GETTERS = {"device", "is_cuda", "is_cpu"}
_MOVES = {"to", "cuda", "cpu"}
_CROSS_OK = {"copy_", "__set__", "__get__", "numpy", "get_device", "untyped_storage", "data_ptr",
             "dim", "size", "numel", "element_size", "is_contiguous", "stride", "storage_offset",
             "_has_compatible_shallow_copy_type"}


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _owner(func):
    return getattr(func, "__self__", None)


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _cuda_indices(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``.to(0)`` / ``.to(device=1)``: integer devices are GPUs (a CPU build of torch refuses them)."""
    if args and _is_index(args[0]):
        args = (torch.device("cuda", args[0]), *args[1:])
    if _is_index(kwargs.get("device")):
        kwargs = {**kwargs, "device": torch.device("cuda", kwargs["device"])}
    return args, kwargs


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class DeviceEmulation(TorchFunctionMode):
    """The torch function mode that does the emulation (see the module docstring)."""

    def __init__(self, registry: WeakIdKeyDictionary | None = None) -> None:
        super().__init__()
        self.registry = WeakIdKeyDictionary() if registry is None else registry
        self.ops_checked = 0

    # ---- the registry ---------------------------------------------------------------------------
    def device_of(self, t: torch.Tensor) -> str:
        s = _storage(t)
        found = self.registry.get(s) if s is not None else None
        return found if found is not None else str(t.device)

    def register(self, t: torch.Tensor, device: str) -> torch.Tensor:
        s = _storage(t)
        if s is None:
            return t
        if device == "cpu":
            self.registry.pop(s, None)
        else:
            self.registry[s] = device
        return t

    # ---- the interception -----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, owner = _name(func), _owner(func)
        if name == "__get__" and isinstance(owner, type(torch.Tensor.device)) and owner.__name__ in _GETTERS:
            t = args[0]
            fake = self.device_of(t)
            if owner.__name__ == "device":
                return torch.device(fake)
            return fake.startswith("cuda") if owner.__name__ == "is_cuda" else fake == "cpu"
        if name == "__get__" and isinstance(owner, type(torch.Tensor.device)) and owner.__name__ == "grad":
            grad = func(*args, **kwargs)
            fake = self.device_of(args[0])
            if grad is not None and fake != "cpu" and self.device_of(grad) == "cpu":
                self.register(grad, fake)  # rule 9: autograd (C++) accumulates it where its tensor lives
            return grad
        if name == "get_device" and args and isinstance(args[0], torch.Tensor):
            fake = torch.device(self.device_of(args[0]))
            return -1 if fake.type == "cpu" else fake.index
        if name == "numpy" and args and self.device_of(args[0]) != "cpu":
            raise TypeError(f"can't convert {self.device_of(args[0])} device type tensor to numpy. "
                            "Use Tensor.cpu() to copy the tensor to host memory first.")
        if func is torch.device and args and _is_index(args[0]):
            return torch.device("cuda", args[0])  # an integer device is a GPU, as on a CUDA build
        if name == "_parse_to":  # nn.Module.to(0)
            args, kwargs = _cuda_indices(args, kwargs)
            return func(*args, **kwargs)
        if name in _MOVES and args and isinstance(args[0], torch.Tensor):
            return self._move(func, name, args, kwargs)
        if name in _CROSS_OK:
            return func(*args, **kwargs)
        return self._op(func, name, args, kwargs)

    def _move(self, func, name: str, args, kwargs):
        t, rest = args[0], args[1:]
        source = self.device_of(t)
        if name == "cpu":
            target, real_args, real_kwargs = "cpu", (), {}
        elif name == "cuda":
            index = rest[0] if rest else kwargs.get("device")
            index = 0 if index is None else torch.device(index).index if not isinstance(index, int) else index
            target, real_args, real_kwargs = f"cuda:{index or 0}", (), {
                k: v for k, v in kwargs.items() if k in ("non_blocking", "memory_format")}
            func = torch.Tensor.to
        else:  # .to(...)
            if rest and isinstance(rest[0], torch.Tensor):
                target = self.device_of(rest[0])
                real_args, real_kwargs = (rest[0].dtype, *rest[1:]), dict(kwargs)
            else:
                rest, kwargs = _cuda_indices(rest, kwargs)
                device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*rest, **kwargs)
                target = source if device is None else str(device if device.index is not None or device.type == "cpu"
                                                            else torch.device(device.type, 0))
                real_kwargs = {"non_blocking": non_blocking}
                if dtype is not None:
                    real_kwargs["dtype"] = dtype
                if memory_format is not None:
                    real_kwargs["memory_format"] = memory_format
                real_args = ()
        out = func(t, *real_args, **real_kwargs) if name != "cpu" else t
        same_storage = _storage(out) is not None and _storage(out) is _storage(t)
        if target != source and same_storage:
            out = out.clone()  # a real move copies
        if target != source or not same_storage:  # a moved tensor, or a dtype/format copy on the same device
            self.register(out, target)
        return out

    def _op(self, func, name: str, args, kwargs):
        self.ops_checked += 1
        fake_target = None
        if "device" in kwargs and kwargs["device"] is not None:
            dev = torch.device(kwargs["device"]) if not isinstance(kwargs["device"], int) else torch.device("cuda", kwargs["device"])
            if dev.type == "cuda":
                fake_target = str(dev if dev.index is not None else torch.device("cuda", 0))
                kwargs = {**kwargs, "device": "cpu"}
            else:
                fake_target = "cpu"
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        seen: list[str] = []
        for x in tensors:
            d = self.device_of(x)
            if d == "cpu" and x.dim() == 0:
                continue  # a 0-dim CPU tensor may mix, as in CUDA
            if d not in seen:
                seen.append(d)
        if fake_target is None and len(seen) > 1:
            cuda_first = sorted(seen, key=lambda d: (d == "cpu", seen.index(d)))
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{cuda_first[0]} and {cuda_first[1]}! (emulated, in {name or func})")
        if fake_target is None:
            # new_* factories and *_like functions follow their tensor argument, as torch does
            fake_target = seen[0] if seen else ("cpu" if not tensors else self.device_of(tensors[0]))
        inputs = {id(s) for s in (_storage(x) for x in tensors) if s is not None}
        out = func(*args, **kwargs)
        if fake_target != "cpu":
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    s = _storage(x)
                    if s is not None and id(s) not in inputs and self.registry.get(s) is None:
                        self.registry[s] = fake_target
        return out


def _active() -> DeviceEmulation:
    mode = _STATE.get("mode")
    if mode is None:
        raise RuntimeError("device emulation is not active: use `with emulate():`")
    return mode


def device_of(t: torch.Tensor) -> str:
    """The emulated device of ``t`` (``"cpu"`` when it has none)."""
    return _active().device_of(t)


@contextlib.contextmanager
def emulate() -> Iterator[DeviceEmulation]:
    """Turn the emulation on in this thread (and in thread-pool workers started while it is on).

    The registry lives as long as the process, so tensors placed inside one ``emulate()`` keep their
    devices in the next one.
    """
    if _STATE["registry"] is None:
        _STATE["registry"] = WeakIdKeyDictionary()
    registry = _STATE["registry"]
    original_submit = concurrent.futures.ThreadPoolExecutor.submit

    def submit(self, fn, /, *args, **kwargs):
        def emulated(*a, **k):
            with DeviceEmulation(registry):
                return fn(*a, **k)
        return original_submit(self, emulated, *args, **kwargs)

    mode = DeviceEmulation(registry)
    previous = _STATE.get("mode")
    concurrent.futures.ThreadPoolExecutor.submit = submit
    _STATE["mode"] = mode
    try:
        with mode, _grouping_by_emulated_device():
            yield mode
    finally:
        concurrent.futures.ThreadPoolExecutor.submit = original_submit
        _STATE["mode"] = previous


def _group_by_device_and_dtype(tensorlistlist, with_indices: bool = False):
    """``torch._C._group_tensors_by_device_and_dtype`` by the emulated devices: the C++ original sees
    every tensor on the real CPU, so torch's foreach paths (AdamW, ``clip_grad_norm_``) would put
    tensors of two emulated GPUs in one group, which CUDA never does."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[list], list[int]]] = {}
    for index, tensor in enumerate(tensorlistlist[0]):
        lists, indices = groups.setdefault((tensor.device, tensor.dtype), ([[] for _ in tensorlistlist], []))
        for out, source in zip(lists, tensorlistlist):
            if source:  # an empty list (AdamW's max_exp_avg_sqs without amsgrad) stays empty
                out.append(source[index])
        indices.append(index)
    return groups


@contextlib.contextmanager
def _grouping_by_emulated_device() -> Iterator[None]:
    import importlib
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for name in ("torch.optim.optimizer", "torch.nn.utils.clip_grad"):
            stack.enter_context(mock.patch.object(importlib.import_module(name), "_group_tensors_by_device_and_dtype",
                                                  _group_by_device_and_dtype))
        yield


# ---- placing a model the way accelerate's device_map="auto" does -----------------------------------
def device_map(model: nn.Module, n_devices: int) -> dict[str, str]:
    """accelerate-style map: embedding on cuda:0, decoder layers split in ``n_devices`` contiguous
    runs, final norm and rotary embedding on the last device; LM head on the last device unless tied
    (then on the embedding's device, since it *is* the embedding's weight)."""
    layers = len(model.model.layers)
    last = f"cuda:{n_devices - 1}"
    mapping = {"model.embed_tokens": "cuda:0"}
    for i in range(layers):
        mapping[f"model.layers.{i}"] = f"cuda:{min(n_devices - 1, i * n_devices // layers)}"
    mapping["model.norm"] = last
    mapping["model.rotary_emb"] = last
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    mapping["lm_head"] = "cuda:0" if tied else last
    return mapping


def _move_inputs(device: str):
    def hook(module, args, kwargs):
        move = (lambda x: x.to(device) if isinstance(x, torch.Tensor) else x)
        return tree_map(move, args), tree_map(move, kwargs)
    return hook


def place(model: nn.Module, mapping: dict[str, str]) -> nn.Module:
    """Register every parameter and buffer of each mapped module on its device and hook the module
    to move its inputs there (accelerate's ``AlignDevicesHook``). Needs an active :func:`emulate`."""
    mode = _active()
    for name, device in mapping.items():
        module = model.get_submodule(name)
        for tensor in [*module.parameters(), *module.buffers()]:
            mode.register(tensor, device)
        module.register_forward_pre_hook(_move_inputs(device), with_kwargs=True)
    return model


def emulated_model(family: str, n_devices: int, *, tied: bool = False) -> tuple[nn.Module, Any]:
    """A tiny fp32 model (``tests.tiny``) and its Arch, placed over ``n_devices`` emulated GPUs;
    ``tied=True`` ties the LM head to the embedding. Call inside :func:`emulate`."""
    model = tiny_twin(family, tied)
    from tests.tiny import tiny_arch

    return place(model, device_map(model, n_devices)), tiny_arch(family)


def checkpoint_saver(root) -> Any:
    """``save(family, tied=False) -> directory``: the tiny twin saved once under ``root`` as a complete
    checkpoint (safetensors + tokenizer), for tests that load from disk."""
    from pathlib import Path

    from tests.tiny import char_tokenizer

    def save(family: str, tied: bool = False) -> str:
        directory = Path(root) / f"{family}-{'tied' if tied else 'untied'}"
        if not directory.is_dir():
            tiny_twin(family, tied).save_pretrained(directory)
            char_tokenizer().save_pretrained(directory)
        return str(directory)

    return save


def tiny_twin(family: str, tied: bool = False) -> nn.Module:
    """The tiny model of ``tests.tiny`` (untied), or the same weights with the LM head tied."""
    from tests.tiny import tiny_model

    model = tiny_model(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


@contextlib.contextmanager
def mixes() -> Iterator[None]:
    """Expect a device-mixing error inside the block (for planted-mix tests)."""
    import pytest

    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        yield
