"""Latency arithmetic of masked models: estimated latency and speedup from per-block-type costs.

Pure Python. The costs are measured once per device and model by ``actors.latency`` (what removing
one attention block and one MLP block saves, per phase and sequence length) and stored as JSON;
everything here is arithmetic on those figures:

    latency(mask) = fixed + sum over kept attention blocks of attn * (units kept / units)
                          + sum over kept MLP blocks of mlp * (channels kept / channels)
    speedup(mask) = latency(dense) / latency(mask)

``fixed`` is what no mask removes: embeddings, final norm, LM head and per-call overhead. Narrowed
blocks are costed in proportion to their width, a first-order model (SPRINT removes whole blocks,
for which it is exact by construction of the measurement).

SPRINT's own arithmetic (``CompressionManager.get_latency``) has no fixed part: the latency of a
model is the sum of its kept blocks' per-type latencies, so removing a block saves a larger share
than with ``fixed`` counted, and a given target speedup is reached with fewer removals.
:meth:`BlockCosts.blocks_only` gives those costs (SPRINT's campaigns use them unless
``search.sprint.latency_fixed``).

A latency *scenario* is a prompt of ``prompt`` tokens followed by ``generate`` decoded tokens:
cost = prefill(prompt) + generate * decode(prompt), each a :class:`BlockCosts`. SPRINT's is a
1,024-token prompt and 512 generated tokens (``model.generate``, batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    from .arch import Arch
    from .mask import BlockKind, Mask

PHASES: tuple[str, ...] = ("prefill", "decode")


@dataclass(frozen=True)
class BlockCosts:
    """Seconds of one forward call: the fixed part, and one full attention / MLP block."""

    fixed: float
    attn: float
    mlp: float

    def __add__(self, other: BlockCosts) -> BlockCosts:
        return BlockCosts(self.fixed + other.fixed, self.attn + other.attn, self.mlp + other.mlp)

    def scaled(self, factor: float) -> BlockCosts:
        return BlockCosts(self.fixed * factor, self.attn * factor, self.mlp * factor)

    def of(self, kind: BlockKind) -> float:
        return self.attn if kind == "attn" else self.mlp

    def blocks_only(self) -> BlockCosts:
        """These costs without the fixed part: SPRINT's latency model (the sum of kept blocks)."""
        return BlockCosts(0.0, self.attn, self.mlp)


@dataclass(frozen=True)
class Scenario:
    """What "latency" means: prefill of ``prompt`` tokens, then ``generate`` decode steps (batch 1)."""

    prompt: int = 1024  # SPRINT's scenario: a 1,024-token prompt ...
    generate: int = 512  # ... and 512 generated tokens

    def entries(self) -> list[tuple[str, int]]:
        """The (phase, length) measurements this scenario needs."""
        return [("prefill", self.prompt)] + ([("decode", self.prompt)] if self.generate else [])

    def __str__(self) -> str:
        tail = f" + {self.generate} decoded tokens" if self.generate else ""
        return f"prefill of {self.prompt} tokens{tail}"


@dataclass(frozen=True)
class LatencyTable:
    """Measured :class:`BlockCosts` of one model on one device, keyed by ``"phase:length"``.

    ``dense`` holds the measured latency of the dense model per entry, so the additive model's
    error at the dense point can be stated (it is zero for ``fixed`` derived from it).
    """

    device: str
    model: str
    costs: Mapping[str, BlockCosts]
    dense: Mapping[str, float]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)  # how it was measured (repeats, threads)

    @staticmethod
    def key(phase: str, length: int) -> str:
        if phase not in PHASES:
            raise ValueError(f"latency phase {phase!r} is not one of {', '.join(PHASES)}")
        return f"{phase}:{int(length)}"

    def has(self, scenario: Scenario) -> bool:
        return all(self.key(p, n) in self.costs for p, n in scenario.entries())

    def scenario_costs(self, scenario: Scenario) -> BlockCosts:
        """prefill(prompt) + generate x decode(prompt); KeyError naming the missing measurement."""
        total = BlockCosts(0.0, 0.0, 0.0)
        for phase, length in scenario.entries():
            key = self.key(phase, length)
            if key not in self.costs:
                raise KeyError(f"latency table of {self.device} has no {key} measurement; measure it with "
                               f"actors.latency.latency_table(..., scenario) (measured: {sorted(self.costs)})")
            total = total + self.costs[key].scaled(scenario.generate if phase == "decode" else 1)
        return total

    def merged(self, other: LatencyTable) -> LatencyTable:
        """This table with ``other``'s entries added (``other`` wins on a shared key)."""
        return LatencyTable(self.device, self.model, {**self.costs, **other.costs}, {**self.dense, **other.dense},
                            {**(self.meta or {}), **(other.meta or {})})

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.model, "dense": dict(sorted(self.dense.items())),
                "costs": {k: {"fixed": c.fixed, "attn": c.attn, "mlp": c.mlp} for k, c in sorted(self.costs.items())},
                "meta": dict(self.meta or {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        costs = {k: BlockCosts(float(v["fixed"]), float(v["attn"]), float(v["mlp"])) for k, v in data["costs"].items()}
        return cls(str(data["device"]), str(data["model"]), costs, {k: float(v) for k, v in data["dense"].items()},
                   dict(data.get("meta") or {}))


def mask_latency(mask: Mask, arch: Arch, costs: BlockCosts) -> float:
    """Estimated seconds of the model ``mask`` leaves."""
    total = costs.fixed
    for layer in range(arch.num_layers):
        total += costs.attn * mask.heads_kept(layer, arch.num_head_units) / arch.num_head_units
        total += costs.mlp * mask.mlp_kept(layer, arch.intermediate_size) / arch.intermediate_size
    return total


def speedup(mask: Mask, arch: Arch, costs: BlockCosts) -> float:
    """Estimated dense latency / latency of ``mask`` (1.0 for the dense model; inf once nothing that
    costs time is left, possible without a fixed part)."""
    from .mask import Mask

    kept = mask_latency(mask, arch, costs)
    return mask_latency(Mask(), arch, costs) / kept if kept > 0 else math.inf


def importance(sensitivity: float, saving: float) -> float:
    """SPRINT's importance: sensitivity per second saved; lower goes first. NaN or no saving: inf."""
    if not math.isfinite(sensitivity) or saving <= 0:
        return math.inf
    return sensitivity / saving


def rank_candidates(sensitivity: Mapping[int, float], costs: BlockCosts) -> list[int]:
    """Block indices by importance (``sensitivity / saving of their kind``), lowest first.

    Ties go to the lower block index, so the ranking is a pure function of its inputs.
    """
    from .mask import Block

    def key(index: int) -> tuple[float, int]:
        return importance(sensitivity[index], costs.of(Block.from_index(index).kind)), index

    return sorted(sensitivity, key=key)


def best_candidate(sensitivity: Mapping[int, float], costs: BlockCosts) -> int | None:
    """The lowest-importance block of ``sensitivity`` (None when it is empty)."""
    ranked = rank_candidates(sensitivity, costs)
    return ranked[0] if ranked else None


def check_costs(costs: Iterable[tuple[str, BlockCosts]]) -> list[str]:
    """Problems with measured costs that would make the ranking meaningless (non-positive savings)."""
    problems = []
    for key, c in costs:
        for kind in ("attn", "mlp"):
            if not c.of(kind) > 0:  # also catches NaN
                problems.append(f"{key}: removing one {kind} block saves {c.of(kind):.3g} s (noise?); "
                                f"re-measure on a quieter device or with more repeats")
    return problems
