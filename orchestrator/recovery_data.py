"""The training set of recovery fine-tuning: built from instructions, text or the run's own corpus;
split into train and validation; kept away from the held-out windows; stored as Parquet.

Three kinds of data (:func:`resolve_format`):

- ``alpaca``: instruction rows (:mod:`orchestrator.data.instructions`), one example a row, the
  prompt masked out of the loss, as MultiPruner's recovery/finetune.py trains;
- ``text``: a corpus spec of :mod:`orchestrator.data.corpus` (its TRAIN split), tokenized into one
  stream (EOS between documents, as the evaluation windows are) and cut into consecutive windows of
  ``max_length`` tokens, every token learned;
- ``run``: the run's own corpus as text. Its TRAIN split never holds the held-out text, which comes
  from the TEST split.

The validation rows are drawn as MultiPruner draws them: ``datasets``' ``train_test_split(
test_size=val_rows, shuffle=True, seed=seed)`` over the examples. Then any example that shares one
``ngram``-token span with a held-out window is dropped, so that a recovered model's held-out
perplexity measures text it never trained on, whatever the data. The n-grams are matched by a 64-bit
polynomial hash and every hash hit is confirmed on the tokens, so the check is exact.

numpy only at import; datasets and pyarrow load inside functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .data.corpus import CorpusError, load_documents
from .data.instructions import IGNORE, read_instructions, tokenize_instructions
from .data.windows import token_stream
from .files import write_via

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["FORMATS", "RecoveryExamples", "build_examples", "read_examples", "resolve_format",
           "shared_ngrams", "write_examples"]

FORMATS = ("auto", "alpaca", "text")
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the n-gram hash
_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class RecoveryExamples:
    """Token ids and labels of the training and validation examples, int64 1-D arrays of varying
    length (labels are -100 where a token is not learned), and ``stats``: how they were made."""

    train_ids: list[np.ndarray]
    train_labels: list[np.ndarray]
    val_ids: list[np.ndarray]
    val_labels: list[np.ndarray]
    stats: dict[str, Any]


def resolve_format(data: str, fmt: str) -> str:
    """``alpaca`` or ``text`` for ``data`` under ``fmt`` (auto, alpaca or text).

    ``auto``: ``run`` is text; a ``.jsonl`` or ``.json`` path and any ``hf:`` spec are alpaca
    (``hf:NAME[:CONFIG]:SPLIT``); presets and other files are text. An ``hf:`` text corpus needs
    ``format: text`` and its COLUMN form, ``hf:NAME[:CONFIG]:SPLIT:COLUMN``. ``run`` is always text.
    """
    if fmt not in FORMATS:
        raise CorpusError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if data == "run":
        if fmt == "alpaca":
            raise CorpusError("data: run is the run's own text corpus, not instructions; use format: text or auto.")
        return "text"
    if fmt != "auto":
        return fmt
    if data.startswith("hf:") or Path(data).suffix.lower() in (".jsonl", ".json"):
        return "alpaca"
    return "text"


# --------------------------------------------------------------------------- building


def build_examples(tokenizer: PreTrainedTokenizerBase, data: str, *, fmt: str = "auto",
                   run_corpus: str | None = None, max_length: int = 256, val_rows: int = 2000, seed: int = 42,
                   heldout: np.ndarray | None = None, ngram: int = 32) -> RecoveryExamples:
    """The recovery examples of ``data`` (``run``, a corpus spec, an instruction file or ``hf:`` spec).

    ``run`` reads the TRAIN split of ``run_corpus``. ``val_rows`` examples are split off for
    validation (0: none). Examples without a learned token, and examples that share an ``ngram``-token
    span with a row of ``heldout`` (int array (windows, length); None: no check), are dropped from
    both parts. Raises :class:`CorpusError` for unreadable data or too few examples.
    """
    if val_rows < 0 or ngram < 1:
        raise CorpusError(f"val_rows={val_rows} must be at least 0 and ngram={ngram} at least 1.")
    kind = resolve_format(data, fmt)
    if data == "run":
        if run_corpus is None:
            raise CorpusError("data: run trains on the run's corpus, but none was given; "
                              "give data.corpus of the run, or a data file.")
        source, spec = f"run ({run_corpus}, train split)", run_corpus
    else:
        source, spec = data, data
    if kind == "alpaca":
        rows = read_instructions(spec)
        pairs, truncated = tokenize_instructions(tokenizer, rows, max_length)
        ids = [np.asarray(i, dtype=np.int64) for i, _ in pairs]
        labels = [np.asarray(label, dtype=np.int64) for _, label in pairs]
        rows_read = len(rows)
    else:
        documents = load_documents(spec, "train")
        ids, truncated, rows_read = _text_windows(tokenizer, documents, max_length, spec), 0, len(documents)
        labels = [window.copy() for window in ids]
    train, val = _split(len(ids), val_rows, seed)
    keep = _learned(labels)
    dropped_empty = int((~keep).sum())
    clean = np.ones(len(ids), dtype=bool) if heldout is None else ~_overlapping(ids, heldout, ngram)
    dropped_overlap = int((keep & ~clean).sum())
    train, val = train[keep[train] & clean[train]], val[keep[val] & clean[val]]
    stats = {
        "source": source, "format": kind, "rows_read": rows_read,
        "train_examples": len(train), "val_examples": len(val),
        "train_tokens": int(sum(ids[i].size for i in train)),
        "train_supervised_tokens": int(sum((labels[i] != IGNORE).sum() for i in train)),
        "dropped_overlap": dropped_overlap, "dropped_empty": dropped_empty, "truncated": truncated,
        "overlap_ngram": None if heldout is None else ngram,
    }
    return RecoveryExamples([ids[i] for i in train], [labels[i] for i in train],
                            [ids[i] for i in val], [labels[i] for i in val], stats)


def _text_windows(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], length: int,
                  spec: str) -> list[np.ndarray]:
    """The token stream of ``documents`` cut into consecutive windows of ``length`` (rest dropped)."""
    stream = token_stream(tokenizer, documents)
    count = stream.size // length
    if count == 0:
        raise CorpusError(f"the train split of {spec!r} has {stream.size:,} tokens, fewer than one window of "
                          f"max_length={length}; lower max_length or give a larger corpus.")
    return list(stream[: count * length].reshape(count, length))  # (count, length) rows


def _split(count: int, val_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and validation examples: MultiPruner's ``train_test_split(test_size=
    val_rows, shuffle=True, seed=seed)``; with ``val_rows == 0``, all examples train, in order."""
    if val_rows == 0:
        return np.arange(count), np.zeros(0, dtype=np.int64)
    if val_rows >= count:
        raise CorpusError(f"val_rows={val_rows} validation examples asked, but the data gives only {count}; "
                          f"lower val_rows (0 for none) or give more data.")
    from datasets import Dataset

    parts = Dataset.from_dict({"index": np.arange(count)}).train_test_split(
        test_size=val_rows, shuffle=True, seed=seed)
    return (np.asarray(list(parts["train"]["index"]), dtype=np.int64),
            np.asarray(list(parts["test"]["index"]), dtype=np.int64))


def _learned(labels: Sequence[np.ndarray]) -> np.ndarray:
    """Which examples have at least one learned token (a label other than -100)."""
    return np.array([bool((label != IGNORE).any()) for label in labels], dtype=bool)


# --------------------------------------------------------------------------- held-out overlap


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash (mod 2**64) of every ``n``-gram along the last axis: (..., L) -> (..., L-n+1)."""
    values = np.asarray(tokens).astype(np.uint64)
    count = max(values.shape[-1] - n + 1, 0)
    hashes = np.zeros(values.shape[:-1] + (count,), dtype=np.uint64)
    for k in range(n):  # h = sum_k x[k] * BASE**(n-1-k), wrapping
        hashes *= _BASE
        hashes += values[..., k: k + count]
    return hashes


class _HeldoutNgrams:
    """The n-grams of held-out windows (windows, length), sorted by hash, for exact lookups."""

    def __init__(self, windows: np.ndarray, n: int) -> None:
        self.windows, self.n = windows, n
        hashes = _ngram_hashes(windows, n)  # (windows, length - n + 1)
        self.per_window = hashes.shape[1]
        flat = hashes.reshape(-1)
        self.order = np.argsort(flat, kind="stable")
        self.sorted = flat[self.order]

    def contains(self, stream: np.ndarray, starts: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        """Which n-grams ``stream[s: s + n]`` (s in ``starts``, ``hashes`` theirs) occur in the windows,
        exactly: each hash hit is compared token by token with the held-out n-grams of that hash."""
        low = np.searchsorted(self.sorted, hashes, "left")
        high = np.searchsorted(self.sorted, hashes, "right")
        found = np.zeros(starts.size, dtype=bool)
        span = np.arange(self.n)
        for step in range(int((high - low).max(initial=0))):  # one step unless two held-out hashes collide
            todo = np.flatnonzero(~found & (low + step < high))
            window, offset = np.divmod(self.order[low[todo] + step], self.per_window)
            held = self.windows[window[:, None], offset[:, None] + span]  # (todo, n)
            found[todo] = (held == stream[starts[todo, None] + span]).all(axis=1)
        return found


def _checked_heldout(heldout: np.ndarray, n: int) -> np.ndarray:
    windows = np.asarray(heldout)
    if windows.ndim != 2 or windows.dtype.kind not in "iu":
        raise CorpusError(f"held-out windows must be a 2-D integer array; got {windows.dtype} {windows.shape}.")
    if windows.shape[1] < n:
        raise CorpusError(f"held-out windows of {windows.shape[1]} tokens hold no {n}-gram to check; "
                          f"lower the overlap n-gram to at most {windows.shape[1]}.")
    return windows


def _overlapping(ids: Sequence[np.ndarray], heldout: np.ndarray, n: int) -> np.ndarray:
    """Which examples share at least one ``n``-gram with a held-out window (exact)."""
    index = _HeldoutNgrams(_checked_heldout(heldout, n), n)
    if not ids:
        return np.zeros(0, dtype=bool)
    lengths = np.array([x.size for x in ids])
    stream = np.concatenate(ids)  # every example, end to end; n-grams across two are skipped
    ends = np.cumsum(lengths)
    owner = np.repeat(np.arange(len(ids)), lengths)  # example of each position
    starts = np.flatnonzero(np.arange(stream.size) + n <= ends[owner])  # n-grams inside one example
    hashes = _ngram_hashes(stream, n)[starts]
    overlapping = np.zeros(len(ids), dtype=bool)
    overlapping[owner[starts[index.contains(stream, starts, hashes)]]] = True
    return overlapping


def shared_ngrams(a: np.ndarray, b: np.ndarray, n: int) -> int:
    """How many of the ``n``-grams of the 1-D array ``a`` (counted by position) occur in a row of the
    2-D array ``b``. Exact: hash hits are confirmed on the tokens."""
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or b.ndim != 2:
        raise ValueError(f"shared_ngrams needs a 1-D and a 2-D array; got shapes {a.shape} and {b.shape}.")
    if a.size < n or b.shape[1] < n:
        return 0
    return int(_HeldoutNgrams(b, n).contains(a, np.arange(a.size - n + 1), _ngram_hashes(a, n)).sum())


# --------------------------------------------------------------------------- Parquet


def write_examples(path: str | os.PathLike[str], ids: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    """Write examples as Parquet, one row each, columns ``input_ids`` and ``labels`` (list<int32>),
    atomically (a dot-file renamed into place: readers see the old file or the new, never a torn one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(ids) != len(labels) or any(np.size(i) != np.size(lab) for i, lab in zip(ids, labels)):
        raise CorpusError("write_examples: every example needs as many labels as ids.")
    lengths = np.array([np.size(x) for x in ids], dtype=np.int64)
    if lengths.sum() > _INT32_MAX:
        raise CorpusError(f"{lengths.sum():,} tokens do not fit one Parquet list column; write fewer examples.")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = {}
    for name, rows, lowest in (("input_ids", ids, 0), ("labels", labels, IGNORE)):
        flat = np.concatenate([np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]) if len(rows) else \
            np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < lowest or flat.max() > _INT32_MAX):
            raise CorpusError(f"{name} must lie in [{lowest}, 2**31); got {flat.min()}..{flat.max()}.")
        columns[name] = pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int32)))
    table = pa.table(columns)
    write_via(path, lambda handle: pq.write_table(table, handle))


def read_examples(path: str | os.PathLike[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``(ids, labels)`` written by :func:`write_examples`, int64 1-D arrays. Raises
    :class:`CorpusError` for a missing file, a missing or non-integer-list column, null rows, or an
    example whose labels and ids differ in length."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"recovery examples file {path} does not exist; build it with write_examples.")
    names = pq.read_schema(path).names
    if not {"input_ids", "labels"} <= set(names):
        raise CorpusError(f"{path} needs columns 'input_ids' and 'labels' (it has {names}); write it with "
                          "write_examples.")
    table = pq.read_table(path, columns=["input_ids", "labels"])
    out, lengths = [], []
    for name in ("input_ids", "labels"):
        column = table.column(name).combine_chunks()
        kind = column.type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
            raise CorpusError(f"{path}: column {name!r} is {kind}, expected a list of integers.")
        if column.null_count or column.flatten().null_count:
            raise CorpusError(f"{path}: column {name!r} has null rows; write it with write_examples.")
        sizes = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        out.append(np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else [])
        lengths.append(sizes)
    if not np.array_equal(*lengths):
        raise CorpusError(f"{path}: some examples have labels and ids of different lengths; write it with "
                          "write_examples.")
    return out[0], out[1]
