"""Measuring what removing an attention block and an MLP block saves, on this replica's device.

The replica is timed with the stock Hugging Face forward, which is what a compact export runs:
every block (norm + attention, norm + MLP) is clocked by hooks inside dense forwards, per layer; the
fixed part (embeddings, final norm, LM head, the stand-ins of removed blocks) is the forward with
every block swapped for the export's ``RemovedAttention``/``RemovedMLP`` (put back afterwards;
nothing is copied). A block type costs the median of its layers.

- prefill of T tokens: ``model(ids, use_cache=False, logits_to_keep=1)`` (what ``generate`` runs
  on a prompt: the LM head on the last position only);
- decode at context T: the mean time of one cached decoding step after a T-token prompt.

Each measurement keeps its fastest of ``repeats`` rounds: on a shared machine other processes only
ever add time, and short calls (one block) are rarely disturbed, whereas differences of whole
forwards drown in the noise. ``meta.additivity`` is the relative error of fixed + blocks against the
fastest dense forward, ``meta.per_layer`` the per-layer block times.
Tables are cached as JSON under ``cache_dir()/latency/`` per device, threads, dtype
and model fingerprint; a scenario that needs a new (phase, length) measures only that entry.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from search_spaces.latency import BlockCosts, LatencyTable, Scenario, check_costs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from search_spaces import Arch

DECODE_STEPS = 8


def device_name(device: torch.device) -> str:
    """``cuda-NVIDIA_H200`` or ``cpu-<model name>-<threads>t``: where a latency table is valid."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        name = f"cpu-{name.strip()}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name.strip()).strip("_")


@contextmanager
def blocks_removed(model: PreTrainedModel, attn: bool, mlp: bool) -> Iterator[None]:
    """Every attention (and/or MLP) block of ``model`` removed, as in a compact export; restored after."""
    from .surgery import RemovedAttention, RemovedMLP

    saved = []
    try:
        for index, layer in enumerate(model.model.layers):
            saved.append((layer, layer.self_attn, layer.input_layernorm, layer.mlp, layer.post_attention_layernorm))
            if attn:
                layer.self_attn, layer.input_layernorm = RemovedAttention(index), nn.Identity()
            if mlp:
                layer.mlp, layer.post_attention_layernorm = RemovedMLP(), nn.Identity()
        yield
    finally:
        for layer, self_attn, in_norm, mlp_module, post_norm in saved:
            layer.self_attn, layer.input_layernorm = self_attn, in_norm
            layer.mlp, layer.post_attention_layernorm = mlp_module, post_norm


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(model: PreTrainedModel, phase: str, length: int) -> Callable[[], float]:
    """A function that runs one measurement of ``phase`` at ``length`` and returns its seconds."""
    device = model.model.embed_tokens.weight.device
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)

    def prefill() -> float:
        _sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        return time.perf_counter() - t0

    def decode() -> float:
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # (1, 1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        return (time.perf_counter() - t0) / DECODE_STEPS

    return prefill if phase == "prefill" else decode


@contextmanager
def block_clocks(model: PreTrainedModel) -> Iterator[dict[tuple[str, int, int], list[float]]]:
    """While active, the wall time of every block call: (kind, layer, input tokens) -> seconds.

    A block runs from its norm's pre-hook to its attention/MLP module's hook (the residual add after
    it is not timed); on a GPU every clock reading synchronises first.
    """
    device = model.model.embed_tokens.weight.device
    samples: dict[tuple[str, int, int], list[float]] = {}
    starts: dict[tuple[str, int], tuple[float, int]] = {}
    handles = []

    def pre(key: tuple[str, int]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            _sync(device)
            starts[key] = (time.perf_counter(), args[0].shape[1])

        return hook

    def post(key: tuple[str, int]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            _sync(device)
            t0, tokens = starts.pop(key)
            samples.setdefault((*key, tokens), []).append(time.perf_counter() - t0)

        return hook

    for i, layer in enumerate(model.model.layers):
        for kind, first, last in (("attn", layer.input_layernorm, layer.self_attn),
                                  ("mlp", layer.post_attention_layernorm, layer.mlp)):
            handles += [first.register_forward_pre_hook(pre((kind, i))), last.register_forward_hook(post((kind, i)))]
    try:
        yield samples
    finally:
        for handle in handles:
            handle.remove()


def measure_entry(model: PreTrainedModel, num_layers: int, phase: str, length: int,
                  repeats: int = 5) -> tuple[BlockCosts, float, float, dict[str, list[float]]]:
    """(costs, dense seconds, additivity error, per-layer block seconds) of ``phase`` at ``length``.

    Every block is timed inside ``repeats`` dense forwards (its fastest call counts: short calls
    are rarely disturbed); a block type costs the median over layers (they have the same shapes, so
    a layer far from the others was disturbed in every round). The fixed part is the fastest
    forward with every block removed; ``additivity`` compares fixed + blocks with the dense time.
    """
    tokens = length if phase == "prefill" else 1
    dense, none = [], []
    with torch.inference_mode():
        with block_clocks(model) as samples:
            run = _timer(model, phase, length)
            for round_ in range(repeats + 1):  # round 0 warms up
                dense.append(run())
        with blocks_removed(model, attn=True, mlp=True):
            run = _timer(model, phase, length)
            none = [run() for _ in range(repeats + 1)]
    per_layer = {kind: [min(samples[(kind, i, tokens)][1:] or samples[(kind, i, tokens)]) for i in range(num_layers)]
                 for kind in ("attn", "mlp")}
    costs = BlockCosts(min(none[1:]), *(statistics.median(per_layer[k]) for k in ("attn", "mlp")))
    best_dense = min(dense[1:])
    additivity = (costs.fixed + num_layers * (costs.attn + costs.mlp)) / best_dense - 1
    return costs, best_dense, additivity, per_layer


def measure_latency(model: PreTrainedModel, scenario: Scenario, repeats: int = 5) -> float:
    """Seconds of ``scenario`` on ``model`` as it is (e.g. a compact export; fastest of ``repeats``)."""
    total = 0.0
    with torch.inference_mode():
        for phase, length in scenario.entries():
            run = _timer(model, phase, length)
            run()  # warm-up
            seconds = min(run() for _ in range(repeats))
            total += seconds * (scenario.generate if phase == "decode" else 1)
    return total


def table_path(device: str, dtype: str, model_fingerprint: str, root: Path | None = None) -> Path:
    from .models import cache_dir

    return (root or cache_dir() / "latency") / f"{device}__{dtype}__{model_fingerprint[:24]}.json"


def latency_table(model: PreTrainedModel, arch: Arch, model_fingerprint: str, scenario: Scenario, *,
                  repeats: int = 5, root: Path | None = None) -> LatencyTable:
    """The cached latency table of this model on this device, measuring what ``scenario`` still lacks."""
    device = model.model.embed_tokens.weight.device
    name, dtype = device_name(device), str(model.dtype).removeprefix("torch.")
    path = table_path(name, dtype, model_fingerprint, root)
    table = LatencyTable(name, model_fingerprint, {}, {}, {"dtype": dtype})
    if path.is_file():
        table = LatencyTable.from_dict(json.loads(path.read_text()))
    if table.has(scenario):
        return table
    costs, dense, additivity, per_layer = {}, {}, {}, {}
    for phase, length in scenario.entries():
        key = LatencyTable.key(phase, length)
        for attempt in range(3):  # a noisy measurement is repeated, with more rounds, and never cached
            if key not in table.costs and (key not in costs or check_costs([(key, costs[key])])):
                costs[key], dense[key], additivity[key], per_layer[key] = measure_entry(
                    model, arch.num_layers, phase, length, repeats * 2**attempt)
        if problems := check_costs([(key, costs[key])] if key in costs else []):
            raise RuntimeError(f"latency of {name} could not be measured: {'; '.join(problems)}")
    meta = {"dtype": dtype, "repeats": repeats, "threads": torch.get_num_threads(), "decode_steps": DECODE_STEPS,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
            "additivity": {**(table.meta or {}).get("additivity", {}), **additivity},
            "per_layer": {**(table.meta or {}).get("per_layer", {}), **per_layer}}
    table = table.merged(LatencyTable(name, model_fingerprint, costs, dense, meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return table
