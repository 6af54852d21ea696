"""Search methods: each a ``Searcher`` with ``suggest`` and ``observe``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Proposal, Searcher, Step
from .blockpruner import BlockPrunerSearcher

if TYPE_CHECKING:
    from search_spaces import Arch

    from ..config import SearchConfig


def make_searcher(search: SearchConfig, arch: Arch) -> Searcher:
    """The searcher a config asks for (the config has already checked the method name)."""
    if search.method == "blockpruner":
        return BlockPrunerSearcher(arch, search.target_ratio, search.max_steps)
    raise ValueError(f"search.method {search.method!r} has no searcher")


__all__ = ["BlockPrunerSearcher", "Proposal", "Searcher", "Step", "make_searcher"]
