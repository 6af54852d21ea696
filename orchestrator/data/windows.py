"""Token windows drawn from documents, their fingerprint, and their Parquet form; the held-out
evaluation windows of a campaign.

Windows are stored as Parquet, one row per window, column ``input_ids``. pyarrow loads inside
functions; transformers is only named in type hints.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..files import write_via
from .corpus import CorpusError, load_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["heldout_windows", "read_windows", "token_stream", "token_windows", "windows_fingerprint", "write_windows"]


def token_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    sequences: int,
    length: int,
    seed: int,
    what: str = "calibration",
) -> np.ndarray:
    """``sequences`` non-overlapping windows of ``length`` tokens, int64 of shape (sequences, length).

    Documents are tokenized without special tokens and joined with the tokenizer's EOS id into one
    stream; window offsets are drawn with ``numpy.random.default_rng(seed)`` uniformly among the
    non-overlapping placements and returned in offset order. Same inputs and seed, same windows.
    ``what`` ("calibration" or "evaluation") names the config section in errors. Raises
    :class:`CorpusError` when the stream is shorter than ``sequences * length`` tokens.
    """
    if sequences < 1 or length < 1:
        raise CorpusError(f"data.{what}: sequences={sequences} and length={length} must both be at least 1.")
    stream = token_stream(tokenizer, documents)
    needed = sequences * length
    if stream.size < needed:
        raise CorpusError(
            f"the {what} corpus has {stream.size:,} tokens but {sequences} sequences x {length} tokens "
            f"need {needed:,}. Lower data.{what}.sequences or data.{what}.length, or use a larger corpus."
        )
    rng = np.random.default_rng(seed)
    gaps = np.sort(rng.integers(0, stream.size - needed, size=sequences, endpoint=True))
    offsets = gaps + np.arange(sequences) * length  # (sequences,), increasing, windows disjoint
    return stream[offsets[:, None] + np.arange(length)]  # (sequences, length)


def heldout_windows(tokenizer: PreTrainedTokenizerBase, corpus: str, sequences: int | None, length: int,
                    seed: int, protocol: str = "rayprune") -> np.ndarray:
    """The evaluation windows a campaign with these ``data.evaluation`` settings uses, int64 of shape
    (windows, length): drawn from the test split of ``corpus`` (the held-out corpus: ``data.evaluation.corpus``,
    else ``data.corpus``); under a paper ``protocol``, the consecutive windows of ``corpus`` as that
    paper cuts them (``sequences`` None: all of them; ``seed`` unused)."""
    if protocol != "rayprune":
        from .protocols import evaluation_windows

        return evaluation_windows(tokenizer, protocol, corpus, sequences, length)
    if sequences is None:
        raise CorpusError("data.evaluation.sequences: null applies to the paper protocols only; give a number.")
    return token_windows(tokenizer, load_documents(corpus, "test"), sequences, length, seed, what="evaluation")


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> np.ndarray:
    """All documents' token ids, EOS between consecutive documents, as one int64 array."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no eos_token_id to separate documents; set tokenizer.eos_token.")
    if not documents:
        return np.zeros(0, dtype=np.int64)
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    pieces: list[np.ndarray] = []
    for index, ids in enumerate(encoded):
        if index:
            pieces.append(np.array([eos], dtype=np.int64))
        pieces.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(pieces)


def windows_fingerprint(windows: np.ndarray) -> str:
    """sha256 hex of the shape, then the ids, both as little-endian int64 (dtype-independent)."""
    array = _as_windows(windows)
    digest = hashlib.sha256(np.asarray(array.shape, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return digest.hexdigest()


def _as_windows(windows: np.ndarray) -> np.ndarray:
    array = np.asarray(windows)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise CorpusError(
            "token windows must be a 2-D integer array (sequences, length); "
            f"got {array.dtype} of shape {array.shape}."
        )
    return array


def write_windows(path: str | os.PathLike[str], windows: np.ndarray) -> None:
    """Write windows as Parquet, one row per window, column ``input_ids`` (list<int32>).

    Written to a dot-file beside ``path`` and renamed into place: a reader sees the old file or the
    new one, never a torn one.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    array = _as_windows(windows)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise CorpusError(f"token ids must lie in [0, 2**31); got {array.min()}..{array.max()}.")
    rows, length = array.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * length)
    column = pa.ListArray.from_arrays(offsets, pa.array(array.reshape(-1).astype(np.int32)))
    table = pa.table({"input_ids": column})
    write_via(path, lambda handle: pq.write_table(table, handle))


def read_windows(path: str | os.PathLike[str]) -> np.ndarray:
    """Windows written by :func:`write_windows` (or any Parquet file with an integer-list column
    ``input_ids``), as int64 of shape (rows, length). Raises :class:`CorpusError` when the file is
    missing, lacks the column, is empty, has nulls or windows of different lengths."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"token windows file {path} does not exist; give the calibration.parquet of a run.")
    schema = pq.read_schema(path)
    if "input_ids" not in schema.names:
        raise CorpusError(f"{path} has no column 'input_ids' (columns: {schema.names}); it holds no token windows.")
    column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    kind = column.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not is_list or not pa.types.is_integer(kind.value_type):
        raise CorpusError(f"{path}: column 'input_ids' is {kind}, expected a list of integer token ids.")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(column) == 0 or column.null_count or column.flatten().null_count:
        raise CorpusError(f"{path}: 'input_ids' is empty or has null rows; write it with write_windows.")
    if (lengths != lengths[0]).any() or lengths[0] == 0:
        raise CorpusError(
            f"{path}: windows must all have the same, non-zero length; found lengths "
            f"{sorted(set(lengths.tolist()))[:5]}. Cut them to one length, or draw new ones."
        )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.int64).reshape(len(column), int(lengths[0]))
