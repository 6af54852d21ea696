"""Token windows drawn from documents, their fingerprint and their Parquet form."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.corpus import CorpusError
from orchestrator.data.windows import read_windows, token_windows, windows_fingerprint, write_windows


class CharTokenizer:
    """One token per character (its code point); EOS is 0. Enough for window arithmetic."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


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
