"""``data.protocol`` in a config: presets fill what the config leaves unset, user settings win, the
resolved config loads back unchanged, bad settings are one clear error; the campaign's window sets and
the report follow the protocol; hub corpora use their own splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.config import PROTOCOL_PRESETS, PROTOCOLS, ConfigError, DataConfig
from orchestrator.config_load import load_config, to_yaml
from tests.orchestrator.data import paper_samplers as ref

BASE = ["name=p", "model=m", "search.target_ratio=0.1"]


def _load(tmp_path, *overrides):
    return load_config(None, [*BASE, f"output={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_preset_fills_unset_keys_and_the_resolved_config_loads_back(tmp_path, protocol):
    config = _load(tmp_path, f"data.protocol={protocol}")
    preset = PROTOCOL_PRESETS[protocol]
    assert config.data.corpus == preset["corpus"]
    for section in ("calibration", "evaluation"):
        for key, value in preset[section].items():
            assert getattr(getattr(config.data, section), key) == value, (section, key)
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(config))
    assert load_config(written) == config


def test_default_is_todays_behaviour(tmp_path):
    assert _load(tmp_path).data == DataConfig()  # rayprune: wikipedia, 8 x 128 seed 0, 16 x 256 seed 1234


def test_user_settings_override_the_preset(tmp_path, ):
    data = _load(tmp_path, "data.protocol=sprint", "data.calibration.sequences=16", "data.calibration.seed=3",
                 "data.evaluation.length=1024").data
    assert (data.calibration.sequences, data.calibration.length, data.calibration.seed) == (16, 2048, 3)
    assert (data.evaluation.sequences, data.evaluation.length) == (None, 1024)
    assert data.corpus == PROTOCOL_PRESETS["sprint"]["corpus"]
    local = tmp_path / "alpaca.jsonl"
    local.write_text("{}\n")
    data = _load(tmp_path, "data.protocol=multipruner", f"data.corpus={local}", "data.calibration.width_rows=256").data
    assert (data.corpus, data.calibration.rows, data.calibration.width_rows) == (str(local), 256, 256)


def test_null_takes_the_protocols_value(tmp_path):
    data = _load(tmp_path, "data.protocol=sprint", "data.calibration={sequences: null, rows: null}",
                 "data.evaluation.corpus=null").data
    assert (data.calibration.sequences, data.calibration.rows) == (128, None)
    assert data.evaluation.corpus == PROTOCOL_PRESETS["sprint"]["evaluation"]["corpus"]
    assert _load(tmp_path, "data.evaluation.sequences=null").data.evaluation.sequences == 16  # rayprune's


@pytest.mark.parametrize("overrides, problem", [
    (["data.protocol=blockpruner2"], "data.protocol 'blockpruner2' is not one of rayprune, blockpruner, multipruner, "
                                     "sprint, evopress"),
    (["data.calibration.rows=64"], "data.calibration.rows: Alpaca rows are drawn by the blockpruner and multipruner "
                                   "protocols, not rayprune; remove it, or set data.protocol=blockpruner"),
    (["data.protocol=blockpruner", "data.calibration.width_rows=64"], "data.calibration.width_rows: Alpaca rows are "
                                                                      "drawn by the multipruner protocol, not blockpruner"),
    (["data.protocol=sprint", "data.corpus=wikipedia"], "data.corpus 'wikipedia': the sprint protocol reads rows "
                                                        "through datasets; give a hub dataset"),
    (["data.protocol=evopress", "data.evaluation.corpus=/no/such/wiki.test.raw"], "data.evaluation.corpus "
                                                                                  "'/no/such/wiki.test.raw': the evopress"),
    (["data.calibration.corpus=x.txt"], "data.calibration.corpus 'x.txt' is not supported: calibration windows come "
                                        "from data.corpus; set data.corpus instead"),
    (["data.evaluation.rows=8"], "data.evaluation.rows 8 is not supported: held-out windows are cut from the whole"),
])
def test_bad_protocol_settings_are_one_clear_error(tmp_path, overrides, problem):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, *overrides)
    assert len(caught.value.problems) == 1 and problem in caught.value.problems[0]


# ---- the campaign's window sets ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("protocol-campaign")
    return {"model": save_tiny("llama", root / "model"), "alpaca": ref.write_alpaca(root / "alpaca.jsonl"),
            "test": ref.wikitext_rows(12, seed=2),
            "test_raw": ref.write_wikitext_raw(root / "wiki.test.raw", ref.wikitext_rows(12, seed=2)), "root": root}


def test_campaign_windows_follow_the_protocol(setup, tmp_path):
    from actors.models import load_tokenizer
    from orchestrator.data.campaign_windows import campaign_windows
    from orchestrator.data.corpus import CorpusError
    from orchestrator.data.windows import write_windows

    config = load_config(None, ["name=p", f"model={setup['model']}", "search.target_ratio=0.1",
                                f"output={tmp_path / 'run'}", "data.protocol=multipruner", f"data.corpus={setup['alpaca']}",
                                "data.calibration={rows: 6, width_rows: 4, length: 96}",
                                f"data.evaluation={{corpus: {setup['test_raw']}, length: 96}}"])
    tokenizer = load_tokenizer(setup["model"])
    windows = campaign_windows(config)
    width, block = ref.multipruner_calibration(setup["alpaca"], tokenizer, 4, 6, 96)
    assert set(windows) == {"calibration", "calibration_width", "evaluation"}
    np.testing.assert_array_equal(windows["calibration"], block)
    np.testing.assert_array_equal(windows["calibration_width"], width)
    np.testing.assert_array_equal(windows["evaluation"], ref.wikitext2_test(setup["test"], tokenizer, 96))
    exact = tmp_path / "exact.parquet"
    write_windows(exact, block[:2])
    reused = campaign_windows(load_config(None, [*BASE[:1], f"model={setup['model']}", *BASE[2:],
                                                 f"output={tmp_path / 'run'}", "data.protocol=multipruner",
                                                 f"data.corpus={setup['alpaca']}", f"data.calibration.windows={exact}",
                                                 f"data.evaluation={{corpus: {setup['test_raw']}, length: 96}}"]))
    assert set(reused) == {"calibration", "evaluation"}
    np.testing.assert_array_equal(reused["calibration"], block[:2])
    with pytest.raises(CorpusError, match="rayprune tune draws calibration sets of several sizes"):
        campaign_windows(config, calibration_sizes=[2, 4])


def test_rayprune_evaluation_corpus_is_another_corpus_test_split(setup, tmp_path):
    from actors.models import load_tokenizer
    from orchestrator.data.campaign_windows import campaign_windows
    from orchestrator.data.windows import heldout_windows
    from tests.tiny import write_corpus

    other = write_corpus(tmp_path / "other.txt", seed=5)
    config = load_config(None, ["name=p", f"model={setup['model']}", "search.target_ratio=0.1",
                                f"output={tmp_path / 'run'}", f"data.corpus={write_corpus(tmp_path / 'c.txt')}",
                                "data.calibration={sequences: 2, length: 32}",
                                f"data.evaluation={{corpus: {other}, sequences: 3, length: 32}}"])
    windows = campaign_windows(config)
    expected = heldout_windows(load_tokenizer(setup["model"]), other, 3, 32, 1234)
    np.testing.assert_array_equal(windows["evaluation"], expected)


# ---- hub corpora: their own splits ---------------------------------------------------------------------
def test_a_hub_dataset_with_a_test_split_uses_it(tmp_path):
    from orchestrator.data.corpus import CorpusError, load_documents

    folder = tmp_path / "ds"
    folder.mkdir()
    for split, count in (("train", 8), ("validation", 3), ("test", 4)):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": f"{split} {i}"}) for i in range(count)))
    spec = f"hf:{folder}:train:text"
    assert load_documents(spec, "train") == [f"train {i}" for i in range(8)]  # all of train: no 90/10 cut
    assert load_documents(spec, "test") == [f"test {i}" for i in range(4)]
    assert load_documents(f"hf:{folder}:train/validation:text", "test") == [f"validation {i}" for i in range(3)]
    (folder / "test.jsonl").unlink()
    assert load_documents(spec, "test") == [f"validation {i}" for i in range(3)]  # no test split: validation
    with pytest.raises(CorpusError, match="split 'train/' is malformed"):
        load_documents(f"hf:{folder}:train/:text", "test")


# ---- the report --------------------------------------------------------------------------------------------
def test_report_names_the_protocol(tmp_path):
    from orchestrator.report import write_report
    from orchestrator.rundir import RunDir
    from tests.orchestrator.test_report import synthetic_path, write_run

    run = tmp_path / "run"
    write_run(run, synthetic_path())
    RunDir(run).write_config(_load(tmp_path, "data.protocol=sprint"))
    report = write_report(run).read_text()
    line = next(line for line in report.splitlines() if line.startswith("Data protocol:"))
    assert line.startswith("Data protocol: sprint (as its code); calibration 128 x 2048 tokens at random offsets "
                           "(random.seed 0) of `hf:Salesforce/wikitext:wikitext-2-raw-v1:train:text` joined with spaces")
    assert "every whole 2048-token window of `hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text`" in line


def test_unknown_window_counts_are_refused_where_they_must_be_known(tmp_path, capsys):
    """A paper protocol that leaves the number of windows to its cut: SPRINT's checkpoint sizing,
    `rayprune plan` and `rayprune tune` need a number, and say so before any work."""
    from orchestrator.cli import main
    from orchestrator.tune import default_space
    from tests.tiny import tiny_arch

    with pytest.raises(ConfigError, match="search.method=sprint sizes its activation checkpoints"):
        _load(tmp_path, "data.protocol=blockpruner", "search.method=sprint")
    config = _load(tmp_path, "data.protocol=blockpruner")
    assert config.data.calibration.sequences is None
    with pytest.raises(ValueError, match="rayprune tune draws calibration sets of several sizes"):
        default_space(config, tiny_arch("llama"))
    from tests.tiny import save_tiny

    model = save_tiny("llama", tmp_path / "model")
    (tmp_path / "c.yaml").write_text(f"name: p\nmodel: {model}\nsearch: {{target_ratio: 0.2}}\n"
                                     "data: {protocol: blockpruner}\n")
    assert main(["plan", str(tmp_path / "c.yaml"), "--as-model", "llama2-7b"]) != 0
    assert "plan with explicit counts, e.g. --tokens 65536" in capsys.readouterr().err
