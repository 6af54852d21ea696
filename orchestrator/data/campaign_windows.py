"""The window sets a campaign's evaluators hold, drawn in one place for ``rayprune run`` and ``tune``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from ..config import Config

#: Validation windows (``rayprune tune``) come from the train split with a seed of their own.
VALIDATION_SEED_OFFSET = 7919


def campaign_windows(config: Config, calibration_sizes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Token windows by name.

    - ``calibration``: ``data.calibration.windows`` if set (exact windows from a Parquet file), else
      drawn from the corpus's train split; ``evaluation``: the held-out windows (test split).
    - With ``calibration_sizes`` (``rayprune tune``): ``calibration@<n>`` for each size instead of
      ``calibration``, and ``validation`` windows from the train split (calibration seed + 7919),
      on which trials are ranked.
    """
    from actors.models import load_tokenizer, resolve_tokenizer

    from .corpus import load_documents
    from .windows import read_windows, token_windows

    data = config.data
    cal, ev = data.calibration, data.evaluation
    tokenizer = load_tokenizer(resolve_tokenizer(config.model))  # no weights: the replicas fetch those
    train = None if cal.windows and calibration_sizes is None else load_documents(data.corpus, "train")
    windows = {}
    if calibration_sizes is None:
        windows["calibration"] = (read_windows(cal.windows) if cal.windows else
                                  token_windows(tokenizer, train, cal.sequences, cal.length, cal.seed,
                                                what="calibration"))
    else:
        windows.update({f"calibration@{n}": token_windows(tokenizer, train, n, cal.length, cal.seed)
                        for n in calibration_sizes})
        windows["validation"] = token_windows(tokenizer, train, ev.sequences, ev.length,
                                              cal.seed + VALIDATION_SEED_OFFSET, what="calibration")
    windows["evaluation"] = token_windows(tokenizer, load_documents(data.corpus, "test"), ev.sequences, ev.length,
                                          ev.seed, what="evaluation")
    return windows
