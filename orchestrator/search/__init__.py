"""Search methods: each a ``Searcher`` with ``suggest`` and ``observe``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Proposal, Searcher, Step
from .blockpruner import BlockPrunerSearcher
from .greedy import GreedySearcher
from .multipruner import MultiPrunerSearcher

if TYPE_CHECKING:
    from search_spaces import Arch

    from ..config import SearchConfig


def make_searcher(search: SearchConfig, arch: Arch) -> Searcher:
    """The searcher a config asks for (the config has already checked the method name)."""
    if search.method == "blockpruner":
        return BlockPrunerSearcher(arch, search.target_ratio, search.max_steps)
    if search.method == "multipruner":
        from search_spaces.budget import family_defaults

        defaults = family_defaults(arch)
        return MultiPrunerSearcher(arch, search.target_ratio, search.split or defaults.split,
                                   search.mlp_group or defaults.mlp_group, search.head_group or defaults.head_group,
                                   search.max_steps)
    raise ValueError(f"search.method {search.method!r} has no searcher")


__all__ = ["BlockPrunerSearcher", "GreedySearcher", "MultiPrunerSearcher", "Proposal", "Searcher", "Step",
           "make_searcher"]
