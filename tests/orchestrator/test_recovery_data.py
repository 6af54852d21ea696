"""Recovery fine-tuning data: Alpaca rows and prompts, tokens and masks, text windows, the
validation split, the held-out overlap filter and the Parquet form."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator import recovery_data
from orchestrator.data.corpus import CorpusError
from orchestrator.data.instructions import alpaca_prompt, read_instructions, tokenize_instruction
from orchestrator.recovery_data import (build_examples, read_examples, resolve_format, shared_ngrams,
                                        write_examples)
from tests.tiny import char_tokenizer, write_corpus

EOS = 1  # char_tokenizer's </s>


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def char_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- prompt and tokens


def test_alpaca_templates_are_alpaca_loras():
    assert alpaca_prompt("Sum 2 and 3.", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum 2 and 3.\n\n"
        "### Input:\n2, 3\n\n### Response:\n")
    assert alpaca_prompt("Say hi.") == alpaca_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")


def test_prompt_is_masked_and_eos_appended(tok):
    row = {"instruction": "Add.", "input": "1 1", "output": "2 it is"}
    prompt = alpaca_prompt("Add.", "1 1")
    ids, labels = tokenize_instruction(tok, row, 1000)
    masked = len(char_ids(tok, prompt))  # "\n\n" is one (unknown) token: fewer tokens than characters
    assert ids == char_ids(tok, prompt + "2 it is") + [EOS]
    assert labels == [-100] * masked + char_ids(tok, "2 it is") + [EOS]  # the response and its EOS are learned


def test_truncation_cuts_the_response_and_adds_no_eos(tok):
    row = {"instruction": "Add.", "input": "", "output": "two, that is"}
    prompt = len(char_ids(tok, alpaca_prompt("Add.")))
    ids, labels = tokenize_instruction(tok, row, prompt + 3)
    assert ids == char_ids(tok, alpaca_prompt("Add.") + "two")
    assert labels == [-100] * prompt + char_ids(tok, "two")
    ids, labels = tokenize_instruction(tok, row, prompt - 5)  # the prompt alone is too long
    assert len(ids) == prompt - 5 and set(labels) == {-100}


def test_eos_is_not_doubled(tok):
    ids, _ = tokenize_instruction(tok, {"instruction": "x", "input": "", "output": "done</s>"}, 1000)
    assert ids[-2:] != [EOS, EOS] and ids[-1] == EOS


def test_unlearnable_rows_are_dropped_and_truncation_counted(tok, tmp_path):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long " * 80, "output": "never seen"}]
    examples = build_examples(tok, write_jsonl(tmp_path / "d.jsonl", rows), max_length=256, val_rows=0)
    assert examples.stats["dropped_empty"] == 1 and examples.stats["truncated"] == 1
    assert examples.stats["train_examples"] == 1 and examples.stats["rows_read"] == 2
    assert examples.stats["train_supervised_tokens"] == len("ok") + 1
    assert examples.train_ids[0].dtype == np.int64


# --------------------------------------------------------------------------- reading rows


def test_jsonl_and_json_rows(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"},
            {"instruction": "e", "input": "f", "output": "g", "extra": 1}]
    expected = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": "d"},
                {"instruction": "e", "input": "f", "output": "g"}]
    assert read_instructions(write_jsonl(tmp_path / "d.jsonl", [rows[0], "", "  ", *rows[1:]])) == expected
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_instructions(str(tmp_path / "d.json")) == expected


@pytest.mark.parametrize("lines, needles", [
    (['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", "output": '], ["line 3", "not JSON"]),
    (['{"instruction": "a"}'], ["line 1", "'output'", '"instruction" and "output"']),
    (['{"output": "b"}', '{"instruction": "a", "output": "b"}'], ["line 1", "no 'instruction'"]),
    (['{"instruction": "a", "output": "b"}', '{"instruction": 3, "output": "b"}'], ["line 2", "'instruction' is int"]),
    (['{"instruction": "a", "input": ["x"], "output": "b"}'], ["line 1", "'input' is list"]),
    (['["instruction", "output"]'], ["line 1", "not an object"]),
    (["", "   "], ["holds no rows"]),
])
def test_bad_jsonl_names_file_line_and_fix(tmp_path, lines, needles):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(CorpusError) as caught:
        read_instructions(str(path))
    for needle in [str(path), *needles]:
        assert needle in str(caught.value)


def test_bad_json_and_missing_files(tmp_path):
    (tmp_path / "d.json").write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(CorpusError, match="not a list of objects"):
        read_instructions(str(tmp_path / "d.json"))
    with pytest.raises(CorpusError, match="does not exist.*JSONL.*data: run"):
        read_instructions(str(tmp_path / "none.jsonl"))


def test_hub_failure_points_to_local_jsonl_or_run(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusError) as caught:
        read_instructions("hf:yahma/alpaca-cleaned:train")
    assert "'yahma/alpaca-cleaned', None, split='train'" in str(caught.value)
    assert "local Alpaca JSONL" in str(caught.value) and "data: run" in str(caught.value)
    with pytest.raises(CorpusError, match="malformed"):
        read_instructions("hf:yahma/alpaca-cleaned")


def test_hub_rows_are_validated(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_list(
        [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": None}]))
    with pytest.raises(CorpusError, match=r"hf:x:cfg:train row 1: 'output' is NoneType"):
        read_instructions("hf:x:cfg:train")


# --------------------------------------------------------------------------- format and sources


@pytest.mark.parametrize("data, fmt, expected", [
    ("run", "auto", "text"), ("run", "text", "text"), ("data/a.jsonl", "auto", "alpaca"),
    ("a.JSON", "auto", "alpaca"), ("hf:yahma/alpaca-cleaned:train", "auto", "alpaca"),
    ("hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text", "text", "text"), ("wikipedia", "auto", "text"),
    ("shakespeare", "auto", "text"), ("notes.txt", "auto", "text"), ("rows.jsonl", "text", "text"),
    ("notes.txt", "alpaca", "alpaca"),
])
def test_resolve_format(data, fmt, expected):
    assert resolve_format(data, fmt) == expected


def test_resolve_format_errors():
    with pytest.raises(CorpusError, match="not one of auto, alpaca, text"):
        resolve_format("run", "chat")
    with pytest.raises(CorpusError, match="format: text or auto"):
        resolve_format("run", "alpaca")


def test_run_without_corpus_is_an_error(tok):
    with pytest.raises(CorpusError, match="data: run.*none was given"):
        build_examples(tok, "run", run_corpus=None, val_rows=0)


def test_text_is_cut_into_consecutive_windows(tok, tmp_path):
    from orchestrator.data.corpus import load_documents
    from orchestrator.data.windows import token_stream

    corpus = write_corpus(tmp_path / "c.txt", words=400)
    examples = build_examples(tok, corpus, max_length=50, val_rows=0)
    stream = token_stream(tok, load_documents(corpus, "train"))
    count = stream.size // 50
    assert examples.stats["train_examples"] == count and examples.stats["format"] == "text"
    assert np.array_equal(np.concatenate(examples.train_ids), stream[: count * 50])
    assert all(np.array_equal(i, lab) for i, lab in zip(examples.train_ids, examples.train_labels))
    assert examples.stats["train_supervised_tokens"] == examples.stats["train_tokens"] == count * 50


# --------------------------------------------------------------------------- validation split


def test_val_split_is_seeded_disjoint_and_complete(tok, tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", words=400)
    every = {tuple(x) for x in build_examples(tok, corpus, max_length=20, val_rows=0).train_ids}
    first = build_examples(tok, corpus, max_length=20, val_rows=7, seed=3)
    again = build_examples(tok, corpus, max_length=20, val_rows=7, seed=3)
    other = build_examples(tok, corpus, max_length=20, val_rows=7, seed=4)
    val, train = {tuple(x) for x in first.val_ids}, {tuple(x) for x in first.train_ids}
    assert len(first.val_ids) == len(val) == 7 and not val & train and val | train == every
    assert [tuple(x) for x in again.val_ids] == [tuple(x) for x in first.val_ids]
    assert {tuple(x) for x in other.val_ids} != val
    with pytest.raises(CorpusError, match=rf"val_rows={len(every)} .* only {len(every)}"):
        build_examples(tok, corpus, max_length=20, val_rows=len(every))


def test_val_split_is_multipruners_train_test_split(tok, tmp_path):
    from datasets import Dataset

    rows = [{"instruction": f"row {i}", "output": f"out {i}"} for i in range(30)]
    examples = build_examples(tok, write_jsonl(tmp_path / "d.jsonl", rows), val_rows=5, seed=42)
    theirs = Dataset.from_list(rows).train_test_split(test_size=5, shuffle=True, seed=42)["test"]
    expected = [tokenize_instruction(tok, {"input": "", **r}, 256)[0] for r in theirs]
    assert [x.tolist() for x in examples.val_ids] == expected


# --------------------------------------------------------------------------- held-out overlap


HELD = "the held-out text nobody may train on, ever"  # 43 characters: one window of 43 tokens


@pytest.mark.parametrize("base", [None, 0])  # 0: every n-gram hashes to its last token, all collide
def test_overlap_filter_drops_exactly_the_overlapping_examples(tok, tmp_path, monkeypatch, base):
    if base is not None:
        monkeypatch.setattr(recovery_data, "_BASE", np.uint64(base))
    heldout = np.array([char_ids(tok, HELD)])
    rows = {
        "first 32": {"instruction": "a", "output": "x" + HELD[:32] + "y"},
        "only 31": {"instruction": "b", "output": HELD[:31] + "#" + HELD[32:]},
        "last 32": {"instruction": "c", "output": HELD[-32:]},
        "in the prompt": {"instruction": HELD[5:37], "output": "fine"},
        "unrelated": {"instruction": "d", "output": "something else entirely, " * 3},
    }
    examples = build_examples(tok, write_jsonl(tmp_path / "d.jsonl", list(rows.values())), val_rows=0,
                              heldout=heldout, ngram=32)
    kept = [tokenize_instruction(tok, {"input": "", **rows[k]}, 256)[0] for k in ("only 31", "unrelated")]
    assert [x.tolist() for x in examples.train_ids] == kept
    assert examples.stats["dropped_overlap"] == 3 and examples.stats["overlap_ngram"] == 32


@pytest.mark.parametrize("base", [None, 0])
def test_shared_ngrams_is_exact(monkeypatch, base):
    if base is not None:
        monkeypatch.setattr(recovery_data, "_BASE", np.uint64(base))
    rng = np.random.default_rng(0)
    b = rng.integers(0, 50, size=(4, 64))
    a = np.concatenate([rng.integers(100, 150, 20), b[2, 10:50], rng.integers(100, 150, 20)])
    assert shared_ngrams(a, b, 32) == 40 - 32 + 1
    assert shared_ngrams(a, b, 41) == 0 and shared_ngrams(a[:10], b, 32) == 0
    assert shared_ngrams(rng.integers(0, 50, 500), b, 32) == 0


def test_heldout_shorter_than_ngram_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(CorpusError, match="lower the overlap n-gram to at most 8"):
        build_examples(tok, path, val_rows=0, heldout=np.zeros((2, 8), dtype=np.int64), ngram=32)


# --------------------------------------------------------------------------- Parquet


def test_parquet_roundtrip(tmp_path):
    ids = [np.arange(5), np.array([7, 8]), np.arange(300, 400)]
    labels = [np.array([-100, -100, 2, 3, 4]), np.array([-100, 8]), np.arange(300, 400)]
    write_examples(tmp_path / "train.parquet", ids, labels)
    back_ids, back_labels = read_examples(tmp_path / "train.parquet")
    assert all(np.array_equal(x, y) and y.dtype == np.int64 for x, y in zip(ids + labels, back_ids + back_labels))
    assert len(back_ids) == 3 and [p.name for p in tmp_path.iterdir()] == ["train.parquet"]  # no temp file left
    write_examples(tmp_path / "val.parquet", [], [])
    assert read_examples(tmp_path / "val.parquet") == ([], [])


def test_parquet_errors(tmp_path):
    with pytest.raises(CorpusError, match="as many labels as ids"):
        write_examples(tmp_path / "x.parquet", [np.arange(3)], [np.arange(2)])
    with pytest.raises(CorpusError, match="does not exist"):
        read_examples(tmp_path / "x.parquet")
    from orchestrator.data.windows import write_windows

    write_windows(tmp_path / "w.parquet", np.zeros((2, 4), dtype=np.int64))
    with pytest.raises(CorpusError, match="needs columns 'input_ids' and 'labels'"):
        read_examples(tmp_path / "w.parquet")


# --------------------------------------------------------------------------- the real tokenizer


@pytest.mark.slow
def test_run_corpus_never_overlaps_the_heldout_windows(tmp_path):
    from actors.models import load_tokenizer, resolve_model
    from orchestrator.data.corpus import load_documents
    from orchestrator.data.windows import heldout_windows

    smol = load_tokenizer(resolve_model("smollm2-135m"))
    heldout = heldout_windows(smol, "wikipedia", 16, 256, 1234)
    examples = build_examples(smol, "run", run_corpus="wikipedia", max_length=256, val_rows=16, heldout=heldout)
    assert examples.stats["train_examples"] > 1000 and examples.stats["val_examples"] == 16
    assert all(shared_ngrams(x, heldout, 32) == 0 for x in examples.train_ids + examples.val_ids)

    leaked = tmp_path / "leaked.txt"  # the held-out split itself, given as a text file
    leaked.write_text("\n\n".join(load_documents("wikipedia", "test")))
    dirty = build_examples(smol, str(leaked), max_length=256, val_rows=0, heldout=heldout)
    assert dirty.stats["dropped_overlap"] >= 8  # most of the 16 held-out windows lie in its first 90%
    assert all(shared_ngrams(x, heldout, 32) == 0 for x in dirty.train_ids)
