"""The working-memory budget of a replica: how many bytes of activations it may keep at once.

Two things on a replica grow with the calibration data rather than with the model (SPEC section 8):
the hidden states :meth:`actors.engine.Engine.score_masks` keeps for one batch (up to one residual
stream entering every block, 2L + 1 of them: 20 GiB for Llama-2-70B at batch 4 x 2048 tokens in
bf16) and SPRINT's checkpointed streams (:class:`actors.sprint.Checkpoints`, every window of a window
set at each checkpoint block). The budget bounds both: the engine splits a batch into micro-batches
whose working memory fits it, and SPRINT parks checkpoints in host memory beyond it.

The default on CUDA is :data:`DEFAULT_FRACTION` of what the replica's GPUs hold besides the weights.
On a CPU there is no default limit (None): the kept streams share the machine's RAM with everything
else, the engine behaves exactly as it did before the budget existed, and "host memory" is where
the checkpoints already are. An explicit budget in bytes overrides the default on any device.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from search_spaces import Arch

__all__ = ["DEFAULT_FRACTION", "default_budget", "resolve_budget", "weight_bytes", "engine_bytes_per_sample",
           "micro_batch_size", "tensor_bytes"]

log = logging.getLogger(__name__)

#: Share of the GPUs' memory left after the weights that the kept activations may use. A quarter,
#: because the rest is not free either: the engine's budget and SPRINT's checkpoint budget are each
#: this share and can both be full at once (a held-out evaluate between two SPRINT steps); what the
#: budget does not count also lives there (the LM head's 512-token fp32 logits chunk, attention
#: workspaces, SPRINT's in-step streams and its refit's normal equations, w x w per tuned MLP); and
#: the CUDA caching allocator fragments. Half for the two budgets leaves the other half for those.
DEFAULT_FRACTION = 0.25

_warned: set[str] = set()


def weight_bytes(model: torch.nn.Module, device_type: str = "cuda") -> int:
    """Bytes of the parameters and buffers of ``model`` on devices of ``device_type`` (tied weights once)."""
    tensors = [*model.parameters(), *model.buffers()]  # both iterators already skip shared tensors
    return sum(tensor_bytes(t) for t in tensors if t.device.type == device_type)


def default_budget(model: torch.nn.Module, fraction: float = DEFAULT_FRACTION) -> int | None:
    """``fraction`` of the total memory of the GPUs holding ``model``'s weights, less the weights.

    None (no limit) when no weight is on a CUDA device, or CUDA is not available (a CPU replica, or
    the device emulation of the tests, whose fake GPUs have no memory to ask about). The total, not
    the free memory, so that the figure is the same in every process whatever else has run.
    """
    if not torch.cuda.is_available():
        return None
    devices = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}
    if not devices:
        return None
    total = sum(torch.cuda.get_device_properties(d).total_memory for d in devices)
    return max(0, int((total - weight_bytes(model)) * fraction))


def resolve_budget(budget: int | None, model: torch.nn.Module) -> int | None:
    """An explicit ``budget`` in bytes, else the default for the devices ``model`` lives on."""
    if budget is None:
        return default_budget(model)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {budget}")
    return int(budget)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def engine_bytes_per_sample(arch: Arch, tokens: int, element_size: int, kept: int, concurrent: int = 1) -> int:
    """Working memory of one window of ``tokens`` in ``Engine.score_masks``.

    ``kept`` residual streams (T x H each) are held for the whole batch: the embedding output and
    the stream entering every block where some mask starts. Each of the ``concurrent`` suffixes
    running at once adds the stream it carries and the one the current block writes (2 x H), and the
    MLP's temporaries (gate, up and act(gate) * up: 3 x I).
    """
    per_token = kept * arch.hidden_size + concurrent * (2 * arch.hidden_size + 3 * arch.intermediate_size)
    return tokens * element_size * per_token


def micro_batch_size(budget: int | None, per_sample: int, batch_size: int, what: str = "engine") -> int:
    """The most samples (at most ``batch_size``, at least 1) whose ``per_sample`` bytes fit ``budget``.

    One sample that does not fit alone still runs (the budget is a target, not an allocator): a
    warning says so once per process and ``what``.
    """
    if budget is None or per_sample * batch_size <= budget:
        return batch_size
    if per_sample > budget and what not in _warned:
        _warned.add(what)
        log.warning("%s: one sample needs %.1f MiB of working memory, over the budget of %.1f MiB; "
                    "running one sample at a time anyway", what, per_sample / 2**20, budget / 2**20)
    return max(1, min(batch_size, budget // per_sample))
