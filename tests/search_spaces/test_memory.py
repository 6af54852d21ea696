"""The engine's working memory: SPEC §8's figures for Llama-2-70B, and what each setting moves."""

from __future__ import annotations

import pytest

from search_spaces import Arch
from search_spaces.memory import GIB, dtype_bytes, human_bytes, working_memory

LLAMA70 = Arch.from_hf_config({"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192,
                               "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
                               "vocab_size": 32000})
MIB = 1 << 20


def test_llama2_70b_batch_4_x_2048_in_bf16_matches_the_spec():
    w = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2)
    stream = 4 * 2048 * 8192 * 2
    assert stream == 128 * MIB
    assert w.kept_streams == 161 * stream  # entering each of 160 blocks, and the final stream: about 20 GiB
    assert 20 * GIB <= w.kept_streams < 20.2 * GIB
    assert w.temporaries == stream + 3 * 448 * MIB  # the running stream + gate, up and their product
    assert w.loss == 512 * 32000 * (2 + 4 + 4)
    assert w.total == w.kept_streams + w.temporaries + w.loss and w.sprint is None
    assert w.per_layer * 80 == pytest.approx(w.kept_streams)
    assert "kept streams 20.1 GiB" in w.describe()


def test_each_setting_moves_its_part():
    base = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2)
    assert working_memory(LLAMA70, batch_size=2, tokens=2048, element_bytes=2).kept_streams == base.kept_streams // 2
    fp32 = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=4)
    assert (fp32.kept_streams, fp32.temporaries) == (2 * base.kept_streams, 2 * base.temporaries)
    assert fp32.loss == 512 * 32000 * (4 + 4 + 4)
    two = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2, streams=2)
    assert two.temporaries == 2 * base.temporaries and two.kept_streams == base.kept_streams
    with pytest.raises(ValueError, match="positive"):
        working_memory(LLAMA70, batch_size=0, tokens=2048, element_bytes=2)


def test_sprint_adds_checkpoints_stores_and_refits_and_a_budget_caps_the_checkpoints():
    w = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2, sprint=True, windows=128, top_k=5)
    all_windows = 128 * 2048 * 8192 * 2
    assert w.sprint.checkpoints == 3 * 4 * all_windows  # 3 states x checkpoints at layers 0, 20, 40, 60
    # 4 GiB per stream of all windows: nothing fits the 2 GiB store, but the step's walk records its own
    # checkpoints on the device before the memo takes them (and parks what passes its budget).
    assert w.sprint.step_streams == 4 * all_windows
    assert w.sprint.refits == 5 * (28672**2 + 28672 * 8192) * 8 + 4 * 28672**2 * 8
    assert w.anywhere == w.temporaries + w.loss + w.sprint.refits
    capped = working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2, sprint=True, windows=128,
                            checkpoint_budget=8 * GIB)
    assert capped.sprint.checkpoints == 8 * GIB
    small = working_memory(LLAMA70, batch_size=4, tokens=16, element_bytes=2, sprint=True, windows=4)
    few = 4 * 16 * 8192 * 2
    assert small.sprint.step_streams >= 161 * few  # small windows: the walk keeps every block's stream (below)
    with pytest.raises(ValueError, match="windows"):
        working_memory(LLAMA70, batch_size=4, tokens=2048, element_bytes=2, sprint=True)


def test_dtype_bytes_and_units():
    assert dtype_bytes("auto") == 2 and dtype_bytes("auto", on_gpu=False) == 4 and dtype_bytes("float32") == 4
    with pytest.raises(ValueError, match="use auto"):
        dtype_bytes("int8")
    assert human_bytes(128 * MIB) == "128.0 MiB" and human_bytes(1.5 * GIB) == "1.5 GiB" and human_bytes(12) == "12 B"


def test_sprint_stores_follow_refit_target_and_reference():
    """Streams of 4 windows x 16 tokens (1 MiB each): every store fits the 2 GiB store. In streams:
    C = 4 checkpoints per state, F = 161 entering every block and the end, E = F - C kept beside the
    memo, top_k = 5 refits with two branch streams each (one with the ``current`` reference, a view
    of the kept streams). ``dense`` adds the dense model's every-block streams to the memo."""
    few = 4 * 16 * 8192 * 2

    def sprint(**settings):
        return working_memory(LLAMA70, batch_size=4, tokens=16, element_bytes=2, sprint=True, windows=4,
                              **settings).sprint

    local, current, dense = sprint(), sprint(reference="current"), sprint(refit_target="dense")
    assert local.checkpoints == current.checkpoints == 3 * 4 * few
    assert local.step_streams == (161 - 4 + 2 * 5) * few and current.step_streams == (161 - 4 + 5) * few
    assert dense.checkpoints == (2 * 4 + 161) * few  # the dense state is one of the memo's 3
    assert dense.step_streams == local.step_streams and dense.refits == local.refits
    # The store cap decides: a 100 MiB checkpoint budget keeps no every-block streams (161 MiB), so the
    # walks (the dense one too) record only the checkpoints, and the refits' branches fit: 2 x 5 new streams.
    capped = sprint(refit_target="dense", checkpoint_budget=100 << 20)
    assert capped.checkpoints == 3 * 4 * few and capped.step_streams == max(4, 2 * 5) * few
