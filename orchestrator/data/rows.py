"""The rows of one dataset split, read as the papers read them, through ``datasets``.

The paper protocols (:mod:`orchestrator.data.protocols`) name a dataset by a *spec*:

- a hub dataset split, ``hf:NAME[:CONFIG]:SPLIT:COLUMN`` (``hf:tatsu-lab/alpaca:train:text``,
  ``hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text``), read with ``load_dataset``;
- a local file holding that split's rows, read with a ``datasets`` builder chosen by its suffix:
  ``.jsonl``/``.json`` (``json``), ``.parquet``, ``.csv``, column ``text``; any other suffix is a
  text file read with the ``text`` builder, one row per line, WikiText's way: a line keeps its line
  break and a blank line is an empty row (so ``wiki.test.raw`` gives the hub's WikiText-2 rows).

Unlike :func:`orchestrator.data.corpus.load_documents`, nothing is dropped or stripped: the papers
join every row, empty ones included. datasets loads inside functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .corpus import CorpusError, load_hub_split, parse_hub_spec

if TYPE_CHECKING:
    from datasets import IterableDataset

__all__ = ["read_rows", "stream_rows"]

#: Local file suffix -> datasets builder (anything else: the text builder).
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LOCAL_COLUMN = "text"


def _local(spec: str, streaming: bool) -> tuple[Any, str]:
    from datasets import load_dataset

    path = Path(spec).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CorpusError(f"dataset file {spec!r} {what}; give a .jsonl/.json/.parquet/.csv file with a 'text' "
                          f"column, a text file (one row per line), or a hub split hf:NAME[:CONFIG]:SPLIT:COLUMN.")
    builder = _BUILDERS.get(path.suffix.lower(), "text")
    options = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        rows = load_dataset(builder, data_files={"train": str(path)}, split="train", streaming=streaming, **options)
    except Exception as err:
        raise CorpusError(f"dataset file {spec!r} cannot be read with the datasets {builder!r} builder "
                          f"({type(err).__name__}: {err}); fix the file or convert it.") from err
    if builder == "text":  # WikiText's rows: a blank line is an empty row
        rows = rows.map(lambda row: {"text": row["text"] if row["text"].strip() else ""})
    return rows, LOCAL_COLUMN


def _open(spec: str, streaming: bool) -> tuple[Any, str]:
    if not spec.startswith("hf:"):
        return _local(spec, streaming)
    name, config, split, column = parse_hub_spec(spec)
    return load_hub_split(spec, name, config, split, streaming=streaming), column


def _check_column(spec: str, names: list[str] | None, column: str) -> None:
    if names is not None and column not in names:
        raise CorpusError(f"dataset {spec!r}: no column {column!r}; it has {names}.")


def read_rows(spec: str) -> list[str]:
    """Every row of the split ``spec`` names, in order, unchanged (empty rows kept)."""
    rows, column = _open(spec, streaming=False)
    _check_column(spec, rows.column_names, column)
    values = rows[column]
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise CorpusError(f"dataset {spec!r}: row {bad} of column {column!r} is {values[bad]!r}, not text.")
    return list(values)


def stream_rows(spec: str) -> tuple[IterableDataset, str]:
    """The split ``spec`` names as a streamed ``datasets.IterableDataset`` (nothing downloaded in
    full, e.g. FineWeb-Edu), and the column holding the text."""
    rows, column = _open(spec, streaming=True)
    _check_column(spec, rows.column_names, column)
    return rows, column
