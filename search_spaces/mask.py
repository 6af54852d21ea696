"""Masks: immutable values naming what is removed from a dense model.

A mask says which attention and MLP blocks are gone and, for the blocks that remain, how many head
units and MLP channels are kept (always the *first* ones, after the one-time importance reordering).
Its canonical JSON is the identity used by the cache: two equal masks have the same JSON and key.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

BlockKind = Literal["attn", "mlp"]
KINDS: tuple[BlockKind, ...] = ("attn", "mlp")


@dataclass(frozen=True, order=True)
class Block:
    """One sublayer. Its index orders blocks as they run: layer 0 attn, layer 0 mlp, layer 1 attn..."""

    layer: int
    kind: BlockKind

    @property
    def index(self) -> int:
        return 2 * self.layer + (0 if self.kind == "attn" else 1)

    @classmethod
    def from_index(cls, index: int) -> Block:
        return cls(index // 2, "attn" if index % 2 == 0 else "mlp")

    def __str__(self) -> str:
        return f"{self.kind}{self.layer}"


def _frozen_widths(widths: Mapping[int, int] | Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    items = widths.items() if isinstance(widths, Mapping) else widths
    return tuple(sorted((int(k), int(v)) for k, v in items))


@dataclass(frozen=True)
class Mask:
    """What is removed. The dense model is ``Mask()``.

    ``head_units`` and ``mlp_width`` list only layers that were narrowed: layer -> units (or
    channels) kept. A width of zero is not a width: use block removal (``Mask.normalized`` folds it).
    """

    attn_removed: frozenset[int] = field(default_factory=frozenset)
    mlp_removed: frozenset[int] = field(default_factory=frozenset)
    head_units: tuple[tuple[int, int], ...] = ()
    mlp_width: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_removed", frozenset(int(i) for i in self.attn_removed))
        object.__setattr__(self, "mlp_removed", frozenset(int(i) for i in self.mlp_removed))
        object.__setattr__(self, "head_units", _frozen_widths(self.head_units))
        object.__setattr__(self, "mlp_width", _frozen_widths(self.mlp_width))

    # ---- queries -------------------------------------------------------------------------------
    def removed(self, block: Block) -> bool:
        return block.layer in (self.attn_removed if block.kind == "attn" else self.mlp_removed)

    def removed_blocks(self) -> list[Block]:
        blocks = [Block(i, "attn") for i in self.attn_removed] + [Block(i, "mlp") for i in self.mlp_removed]
        return sorted(blocks, key=lambda b: b.index)

    def heads_kept(self, layer: int, default: int) -> int:
        """Head units kept in ``layer`` (``default`` when not narrowed; 0 when the block is gone)."""
        if layer in self.attn_removed:
            return 0
        return dict(self.head_units).get(layer, default)

    def mlp_kept(self, layer: int, default: int) -> int:
        """MLP channels kept in ``layer`` (``default`` when not narrowed; 0 when the block is gone)."""
        if layer in self.mlp_removed:
            return 0
        return dict(self.mlp_width).get(layer, default)

    def block_state(self, block: Block) -> tuple[bool, int | None]:
        """(present, width or None for full): two masks run a block identically iff equal."""
        if self.removed(block):
            return (False, None)
        widths = dict(self.head_units if block.kind == "attn" else self.mlp_width)
        return (True, widths.get(block.layer))

    def first_difference(self, other: Mask, num_layers: int) -> int | None:
        """Index of the first block that runs differently in ``self`` and ``other`` (None: same)."""
        for index in range(2 * num_layers):
            block = Block.from_index(index)
            if self.block_state(block) != other.block_state(block):
                return index
        return None

    # ---- edits (return new masks) --------------------------------------------------------------
    def remove(self, block: Block) -> Mask:
        if block.kind == "attn":
            return Mask(self.attn_removed | {block.layer}, self.mlp_removed,
                        tuple((l, w) for l, w in self.head_units if l != block.layer), self.mlp_width)
        return Mask(self.attn_removed, self.mlp_removed | {block.layer},
                    self.head_units, tuple((l, w) for l, w in self.mlp_width if l != block.layer))

    def with_heads(self, layer: int, units: int) -> Mask:
        if units == 0:
            return self.remove(Block(layer, "attn"))
        widths = dict(self.head_units) | {layer: units}
        return Mask(self.attn_removed, self.mlp_removed, tuple(widths.items()), self.mlp_width)

    def with_mlp_width(self, layer: int, channels: int) -> Mask:
        if channels == 0:
            return self.remove(Block(layer, "mlp"))
        widths = dict(self.mlp_width) | {layer: channels}
        return Mask(self.attn_removed, self.mlp_removed, self.head_units, tuple(widths.items()))

    # ---- canonical form ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "attn_removed": sorted(self.attn_removed),
            "mlp_removed": sorted(self.mlp_removed),
            "head_units": {str(l): w for l, w in self.head_units},
            "mlp_width": {str(l): w for l, w in self.mlp_width},
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys and lists, no whitespace. Equal masks give equal strings."""
        return self._json

    @functools.cached_property
    def _json(self) -> str:  # computed once per mask: a campaign sends and keys each mask several times
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mask:
        return cls(
            frozenset(data.get("attn_removed", ())),
            frozenset(data.get("mlp_removed", ())),
            tuple((int(l), int(w)) for l, w in data.get("head_units", {}).items()),
            tuple((int(l), int(w)) for l, w in data.get("mlp_width", {}).items()),
        )

    @classmethod
    def from_json(cls, text: str) -> Mask:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        parts = [str(b) for b in self.removed_blocks()]
        parts += [f"heads{l}={w}" for l, w in self.head_units] + [f"mlp{l}={w}" for l, w in self.mlp_width]
        return "dense" if not parts else " ".join(parts)


def mask_key(mask: Mask, model_fingerprint: str, calibration_fingerprint: str) -> str:
    """Content key of one evaluation: the mask, on this model, on this calibration set."""
    payload = json.dumps(
        {"mask": mask.to_dict(), "model": model_fingerprint, "calibration": calibration_fingerprint},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()
