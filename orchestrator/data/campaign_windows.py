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
      drawn from the corpus as ``data.protocol`` draws them (rayprune: its train split; a paper's
      protocol: its sampler, orchestrator/data/protocols.py); under ``multipruner`` also
      ``calibration_width``, the rows MultiPruner's width stages use (unless ``windows`` is set).
    - ``evaluation``: the held-out windows (rayprune: the test split of ``data.evaluation.corpus``,
      else of ``data.corpus``; a paper's protocol: its WikiText-2 test windows).
    - With ``calibration_sizes`` (``rayprune tune``, rayprune protocol only): ``calibration@<n>`` for
      each size instead of ``calibration``, and ``validation`` windows from the train split
      (calibration seed + 7919), on which trials are ranked.
    """
    from actors.models import load_tokenizer, resolve_tokenizer

    from .corpus import CorpusError, load_documents
    from .windows import heldout_windows, read_windows, token_windows

    data = config.data
    cal, ev = data.calibration, data.evaluation
    if calibration_sizes is not None and data.protocol != "rayprune":
        raise CorpusError(f"rayprune tune draws calibration sets of several sizes, which the {data.protocol} "
                          f"protocol does not define; run it with data.protocol=rayprune")
    tokenizer = load_tokenizer(resolve_tokenizer(config.model))  # no weights: the replicas fetch those
    windows = {}
    if data.protocol != "rayprune":
        if not cal.windows:
            from .protocols import calibration_windows

            windows.update(calibration_windows(tokenizer, data))
        else:
            windows["calibration"] = read_windows(cal.windows)
    else:
        train = None if cal.windows and calibration_sizes is None else load_documents(data.corpus, "train")
        if calibration_sizes is None:
            windows["calibration"] = (read_windows(cal.windows) if cal.windows else
                                      token_windows(tokenizer, train, cal.sequences, cal.length, cal.seed,
                                                    what="calibration"))
        else:
            windows.update({f"calibration@{n}": token_windows(tokenizer, train, n, cal.length, cal.seed)
                            for n in calibration_sizes})
            windows["validation"] = token_windows(tokenizer, train, ev.sequences, ev.length,
                                                  cal.seed + VALIDATION_SEED_OFFSET, what="calibration")
    windows["evaluation"] = heldout_windows(tokenizer, ev.corpus or data.corpus, ev.sequences, ev.length, ev.seed,
                                            protocol=data.protocol)
    return windows
