"""The paper protocols give the very token windows of the papers' own samplers (tests/orchestrator/data/
paper_samplers.py, rewritten from their code) on small local datasets, with a BPE tokenizer (SmolLM2's)
and a character tokenizer that adds a BOS, read through the same ``datasets`` path as the hub ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from actors.models import cache_dir
from orchestrator.config import DataConfig, with_protocol
from orchestrator.data.corpus import CorpusError
from orchestrator.data.cuts import pack
from orchestrator.data.protocols import calibration_windows, evaluation_windows
from orchestrator.data.rows import read_rows
from tests.orchestrator.data import paper_samplers as ref


def bos_char_tokenizer():
    """One token per character; ``add_special_tokens=True`` puts ``<s>`` (id 1) first, as Llama's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3, **{chr(c): i + 4 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module", params=["bos-chars", "smollm2"])
def tokenizer(request):
    if request.param == "bos-chars":
        tok = bos_char_tokenizer()
        assert tok("ab")["input_ids"][0] == 1 and tok("ab", add_special_tokens=False)["input_ids"][0] != 1
        return tok
    folder = cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("the converted SmolLM2 preset is not cached (rayprune run with model smollm2-135m makes it)")
    from actors.models import load_tokenizer

    return load_tokenizer(folder)


def _length(tokenizer) -> int:
    return 128 if tokenizer.bos_token == "<s>" else 48  # characters are short tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    train, test = ref.wikitext_rows(30, seed=1), ref.wikitext_rows(12, seed=2)
    hub = root / "wikitext"  # a dataset folder standing in for a hub id: hf:<folder>:<split>:text
    hub.mkdir()
    ref.write_jsonl(hub / "train.jsonl", train)
    ref.write_jsonl(hub / "test.jsonl", test)
    return {"alpaca": ref.write_alpaca(root / "alpaca.jsonl"), "train": train, "test": test,
            "train_raw": ref.write_wikitext_raw(root / "wiki.train.raw", train),
            "test_raw": ref.write_wikitext_raw(root / "wiki.test.raw", test), "hub": hub,
            "fineweb": ref.write_fineweb(root / "fineweb.jsonl")}


def _data(protocol: str, corpus, **calibration) -> DataConfig:
    data = with_protocol(DataConfig(protocol=protocol))
    return dataclasses.replace(data, corpus=str(corpus), calibration=dataclasses.replace(data.calibration,
                                                                                        **calibration))


# ---- rows -----------------------------------------------------------------------------------------
def test_a_wikitext_raw_file_reads_as_the_hub_rows(files):
    """wiki.*.raw through the text builder: headings and paragraphs keep their newline, blanks are ''."""
    assert read_rows(str(files["test_raw"])) == files["test"]
    assert read_rows(f"hf:{files['hub']}:test:text") == files["test"]
    assert "" in files["test"] and files["test"][1].endswith(" = \n")


# ---- BlockPruner, MultiPruner: Alpaca rows -----------------------------------------------------------
def test_blockpruner_calibration_equals_its_sampler(files, tokenizer):
    length = _length(tokenizer)
    got = calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=6, length=length))
    expected = ref.blockpruner_calibration(files["alpaca"], tokenizer, 6, length)
    assert set(got) == {"calibration"} and expected.shape[0] >= 3
    np.testing.assert_array_equal(got["calibration"], expected)
    other_seed = calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=6, length=length, seed=7))
    assert not np.array_equal(other_seed["calibration"], expected)  # the draw matters


def test_multipruner_draws_width_rows_first_then_block_rows(files, tokenizer):
    length = _length(tokenizer)
    got = calibration_windows(tokenizer, _data("multipruner", files["alpaca"], rows=6, width_rows=4, length=length))
    width, block = ref.multipruner_calibration(files["alpaca"], tokenizer, 4, 6, length)
    np.testing.assert_array_equal(got["calibration"], block)
    np.testing.assert_array_equal(got["calibration_width"], width)
    alone = calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=6, length=length))
    assert not np.array_equal(alone["calibration"], block)  # the block rows are the generator's second draw


def test_sequences_keep_the_first_windows_and_too_many_rows_are_refused(files, tokenizer):
    length = _length(tokenizer)
    expected = ref.blockpruner_calibration(files["alpaca"], tokenizer, 6, length)
    got = calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=6, length=length, sequences=2))
    np.testing.assert_array_equal(got["calibration"], expected[:2])
    with pytest.raises(CorpusError, match="too few for 500 consecutive windows"):
        calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=6, length=length, sequences=500))
    with pytest.raises(CorpusError, match="asks for 50 Alpaca rows, but the test part .* holds 9"):
        calibration_windows(tokenizer, _data("blockpruner", files["alpaca"], rows=50, length=length))


# ---- SPRINT: random windows of WikiText-2 train --------------------------------------------------------
@pytest.mark.parametrize("form", ["raw", "hub"])
def test_sprint_calibration_equals_its_sampler(files, tokenizer, form):
    corpus = files["train_raw"] if form == "raw" else f"hf:{files['hub']}:train:text"
    length = _length(tokenizer)
    got = calibration_windows(tokenizer, _data("sprint", corpus, sequences=12, length=length, seed=3))
    expected = ref.sprint_calibration(files["train"], tokenizer, 12, 3, length)
    assert expected.shape == (12, length)
    np.testing.assert_array_equal(got["calibration"], expected)


# ---- EvoPress: streamed, shuffled FineWeb-Edu documents ------------------------------------------------
def test_evopress_takes_the_pieces_of_its_sampler_packed_into_windows(files, tokenizer, monkeypatch):
    from orchestrator.data import cuts

    length = 200 if tokenizer.bos_token == "<s>" else 64
    pieces = []
    original = cuts.document_pieces
    monkeypatch.setattr(cuts, "document_pieces", lambda *a, **k: pieces.extend(original(*a, **k)) or pieces)
    got = calibration_windows(tokenizer, _data("evopress", files["fineweb"], sequences=20, length=length))
    expected = ref.evopress_calibration(files["fineweb"], tokenizer, 20 * length, length)
    assert len(pieces) == len(expected)
    for mine, theirs in zip(pieces, expected):
        np.testing.assert_array_equal(mine, theirs)
    sizes = [p.size for p in expected]
    assert sum(sizes) == 20 * length and min(sizes) < length and sizes.count(length) >= 1  # short and cut documents
    np.testing.assert_array_equal(got["calibration"], pack(expected, length))
    assert got["calibration"].shape == (20, length)


# ---- the held-out WikiText-2 test windows ----------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["blockpruner", "multipruner", "sprint", "evopress"])
def test_heldout_windows_equal_the_papers_eval(files, tokenizer, protocol):
    length = _length(tokenizer)
    got = evaluation_windows(tokenizer, protocol, str(files["test_raw"]), None, length)
    expected = ref.wikitext2_test(files["test"], tokenizer, length, special_tokens=protocol != "evopress")
    assert expected.shape[0] >= 4
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(evaluation_windows(tokenizer, protocol, str(files["test_raw"]), 3, length), got[:3])


def test_bos_starts_the_heldout_text_only_where_the_paper_adds_it(files):
    tokenizer = bos_char_tokenizer()
    with_bos = evaluation_windows(tokenizer, "sprint", str(files["test_raw"]), None, 64)
    without = evaluation_windows(tokenizer, "evopress", str(files["test_raw"]), None, 64)
    assert with_bos[0, 0] == 1 and without[0, 0] != 1 and (with_bos[1:] != 1).all()
    np.testing.assert_array_equal(with_bos.reshape(-1)[1:64], without.reshape(-1)[:63])
