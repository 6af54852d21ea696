"""BlockPruner's and MultiPruner's calibration rows: Alpaca's ``test`` part, drawn with Python's random.

Both papers' ``utils.get_dataset("alpaca")`` split Alpaca's only split 80 / 10 / 10 with
``datasets.Dataset.train_test_split(test_size=0.2, seed=42)`` and then the 20% part with
``train_test_split(test_size=0.5, seed=42)``; the first half of that is their ``test`` part. After
``transformers.set_seed(42)`` (which seeds Python's ``random``), ``random.sample(range(len(test)), n)``
picks the rows, in the order drawn. MultiPruner draws twice from the same generator: first the rows
of the width stages (128), then those of the block stage (256). The rows' ``text`` is then joined
with blank lines and cut into windows (:mod:`orchestrator.data.cuts`).
"""

from __future__ import annotations

import random
from typing import Sequence

from .corpus import CorpusError

__all__ = ["SPLIT_SEED", "alpaca_test_part", "draw_rows"]

SPLIT_SEED = 42  # get_dataset's train_test_split seed (fixed in both papers' code, not their --seed)


def alpaca_test_part(rows: Sequence[str]) -> list[str]:
    """The papers' ``test`` part of Alpaca's rows: 10% of them, in the order ``train_test_split`` gives."""
    from datasets import Dataset

    if len(rows) < 10:
        raise CorpusError(f"the Alpaca rows are {len(rows)}: too few to split 80/10/10 as BlockPruner and "
                          f"MultiPruner do; give the whole dataset (e.g. hf:tatsu-lab/alpaca:train:text).")
    held = Dataset.from_dict({"text": list(rows)}).train_test_split(test_size=0.2, seed=SPLIT_SEED)["test"]
    return list(held.train_test_split(test_size=0.5, seed=SPLIT_SEED)["train"]["text"])


def draw_rows(part: Sequence[str], counts: Sequence[int], seed: int) -> list[list[str]]:
    """``random.seed(seed)``, then for each count in order ``random.sample(range(len(part)), count)``:
    the rows of each draw, in the order drawn."""
    rng = random.Random(seed)
    draws = []
    for count in counts:
        if count > len(part):
            raise CorpusError(f"data.calibration asks for {count} Alpaca rows, but the test part the papers draw "
                              f"from holds {len(part)}; lower data.calibration.rows (or width_rows).")
        draws.append([part[i] for i in rng.sample(range(len(part)), count)])
    return draws
