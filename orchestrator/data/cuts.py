"""How the papers cut token ids into windows: consecutive, at random offsets, or per document.

Each function tokenizes as the paper's code does (one call on the joined text, with or without the
tokenizer's special tokens) and returns int64 windows of shape (windows, length). ``what`` names the
config section (``calibration`` / ``evaluation``) in errors. transformers is only named in hints.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from .corpus import CorpusError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["consecutive_windows", "document_pieces", "encode", "pack", "random_windows"]


def encode(tokenizer: PreTrainedTokenizerBase, text: str, special_tokens: bool) -> np.ndarray:
    """``tokenizer(text)``'s ids as int64; ``special_tokens`` as the paper passes ``add_special_tokens``
    (its default, True, adds e.g. Llama's BOS once, at the very start)."""
    ids = tokenizer(text, add_special_tokens=special_tokens, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def _too_few(what: str, tokens: int, needed: str) -> CorpusError:
    return CorpusError(f"the {what} text has {tokens:,} tokens, too few for {needed}. Lower data.{what}.sequences or "
                       f"data.{what}.length, or give more text (data.calibration.rows, another corpus).")


def consecutive_windows(ids: np.ndarray, length: int, sequences: int | None, what: str) -> np.ndarray:
    """Windows ``[i*length, (i+1)*length)`` for i = 0, 1, ...: every whole one (``sequences`` None),
    else the first ``sequences``. The tail shorter than ``length`` is dropped (``numel // seqlen``)."""
    available = ids.size // length
    count = available if sequences is None else sequences
    if count < 1 or count > available:
        raise _too_few(what, ids.size, f"{max(count, 1)} consecutive window{'s' if count > 1 else ''} of {length} "
                                       f"tokens ({available} fit)")
    return ids[: count * length].reshape(count, length)


def random_windows(ids: np.ndarray, length: int, sequences: int, seed: int, what: str) -> np.ndarray:
    """SPRINT's (and SLEB's) draw: ``random.seed(seed)``, then ``sequences`` times a start
    ``random.randint(0, n - length - 1)`` and the window from it. Windows may overlap or repeat."""
    if ids.size < length + 1:
        raise _too_few(what, ids.size, f"a window of {length} tokens and one more")
    rng = random.Random(seed)
    starts = np.array([rng.randint(0, ids.size - length - 1) for _ in range(sequences)], dtype=np.int64)
    return ids[starts[:, None] + np.arange(length)]  # (sequences, length)


def document_pieces(tokenizer: PreTrainedTokenizerBase, documents: Iterable[str], tokens: int,
                    length: int, what: str) -> list[np.ndarray]:
    """EvoPress's FineWeb-Edu draw: documents in order, each tokenized without special tokens and
    cut to the tokens still wanted, then split into pieces of ``length`` while longer than that (the
    last piece of a document is shorter, or exactly ``length``), until ``tokens`` tokens are taken."""
    pieces: list[np.ndarray] = []
    left = tokens
    iterator = iter(documents)
    while left > 0:
        try:
            document = next(iterator)
        except StopIteration:
            raise _too_few(what, tokens - left, f"{tokens:,} tokens") from None
        ids = encode(tokenizer, document, special_tokens=False)[:left]
        while ids.size > length:
            pieces.append(ids[:length])
            ids = ids[length:]
            left -= length
        pieces.append(ids)
        left -= ids.size
    return pieces


def pack(pieces: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Pieces joined in order (nothing between them) and cut into windows of ``length``: rayprune's
    windows all have one length, EvoPress's pieces do not. A tail shorter than ``length`` is dropped."""
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]) if pieces else np.zeros(0, np.int64)
    count = ids.size // length
    return ids[: count * length].reshape(count, length)
