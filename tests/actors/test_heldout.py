"""Held-out perplexity with the stock forward equals the engine's figure on the masked model."""

from __future__ import annotations

import math

import pytest
import torch

from actors.engine import Engine, Score
from actors.export import export_compact, load_pruned
from actors.forward import LeanDecoder
from actors.heldout import heldout_score, perplexity
from tests.tiny import reorder_by_l1_
from orchestrator.data.windows import heldout_windows
from search_spaces import Mask
from tests.tiny import char_tokenizer, save_tiny, tiny_arch, tiny_model, write_corpus

MASK = Mask(attn_removed={0}, mlp_removed={2}, head_units={1: 1}, mlp_width={3: 16})


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    return heldout_windows(char_tokenizer(), corpus, sequences=5, length=40, seed=3)


def engine_score(family: str, mask: Mask, windows) -> Score:
    arch = tiny_arch(family)
    decoder = LeanDecoder(reorder_by_l1_(tiny_model(family), arch), arch)
    return Engine(decoder, batch_size=2).score_masks(torch.as_tensor(windows), [mask])[0]


def test_windows_come_from_the_test_split(windows, tmp_path):
    assert windows.shape == (5, 40)
    corpus = write_corpus(tmp_path / "c.txt")
    again = heldout_windows(char_tokenizer(), corpus, sequences=5, length=40, seed=3)
    assert (again == windows).all()


def test_dense_model_matches_the_engine(family, windows):
    got = heldout_score(tiny_model(family), windows, batch_size=3)
    expected = engine_score(family, Mask(), windows)
    assert got.tokens == expected.tokens == 5 * 39
    assert got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-5)


def test_compact_export_matches_the_engine_on_the_masked_model(family, windows, tmp_path):
    compact = load_pruned(export_compact(save_tiny(family, tmp_path / "dense"), MASK, tmp_path / "compact"))
    got = heldout_score(compact, windows)
    expected = engine_score(family, MASK, windows)
    assert got.tokens == expected.tokens
    assert perplexity(got) == pytest.approx(perplexity(expected), rel=1e-5)


def test_perplexity_edges():
    assert math.isnan(perplexity(Score(1.0, 0)))
    assert perplexity(Score(2000.0, 2)) == math.inf
    assert perplexity(Score(2.0, 2)) == pytest.approx(math.e)
