"""The run directory never serves a stale or wrong file silently (issue: Nothing lost, defects 5, 10).

Each test here failed on the code before the fix (see the closing note of the issue).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest

from actors.export import export_compact
from orchestrator import cli
from orchestrator.config import Config, DataConfig, SearchConfig, WindowsConfig
from orchestrator.config_load import dump_yaml
from orchestrator.eval_model import load_target
from orchestrator.rundir import RunDir, RunDirectoryBusy
from orchestrator.search.base import Step
from search_spaces import Block, Mask, dense_params, param_count, ratio
from search_spaces.pruning_config import mask_to_pruning_config
from tests.tiny import save_tiny, tiny_arch

ARCH = tiny_arch("llama")
EARLY, LATE = Mask().remove(Block(1, "attn")), Mask().remove(Block(1, "attn")).remove(Block(2, "mlp"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("rundir") / "model")


def path_of(*masks: Mask) -> dict:
    steps = [Step(k, "attn", 1, 10.0 + k, ratio(m, ARCH), m, param_count(m, ARCH)).to_dict()
             for k, m in enumerate(masks, 1)]
    return {"dense_ppl": 10.0, "dense_params": dense_params(ARCH), "steps": steps, "arch": dataclasses.asdict(ARCH),
            "heldout": {"dense_ppl": 9.0, "pruned_ppl": 12.0}}


def make_run(root, model_dir, *masks: Mask, exported: Mask | None = None):
    """A run directory whose path ends at ``masks[-1]``, with model/ and pruning_config.json of ``exported``."""
    run = RunDir(root)
    run.path.mkdir(parents=True, exist_ok=True)
    (run.path / "config.yaml").write_text(f"name: run\nmodel: {model_dir}\n")
    run.write_path(path_of(*masks))
    if exported is not None:
        export_compact(model_dir, exported, run.path / "model")
        run.write_json("pruning_config.json", mask_to_pruning_config(exported, ARCH))
    return run


def test_a_fresh_run_directory_has_nothing_stale(model_dir, tmp_path):
    assert make_run(tmp_path / "run", model_dir, EARLY, LATE, exported=LATE).stale_artefacts() == []


def test_an_earlier_runs_model_is_detected_by_eval_report_and_rebuilt_by_export(model_dir, tmp_path, caplog):
    run = make_run(tmp_path / "run", model_dir, EARLY, LATE, exported=EARLY)  # died before its export
    stale = run.stale_artefacts()
    assert any(p.startswith("model/") for p in stale) and any(p.startswith("pruning_config.json") for p in stale)

    with caplog.at_level(logging.WARNING, logger="rayprune"):
        target = load_target(str(run.path))
    assert target.kind == "run (masked in memory)"  # not the stale export
    assert "model/ holds another model than step 2" in caplog.text

    assert cli.main(["report", str(run.path)]) == 0
    assert json.loads(run.file("pruning_config.json").read_text()) == mask_to_pruning_config(LATE, ARCH)
    assert "## Stale files" in run.file("report.md").read_text()

    assert cli.main(["export", str(run.path)]) == 0
    assert run.stale_artefacts() == []


def test_an_earlier_step_export_is_detected(model_dir, tmp_path):
    run = make_run(tmp_path / "run", model_dir, EARLY, LATE, exported=LATE)
    export_compact(model_dir, LATE, run.path / "model-step-1")  # step 1 of another path
    assert [p for p in run.stale_artefacts() if p.startswith("model-step-1/")]


def test_a_width_export_made_with_another_channel_order_is_stale_and_rebuilt_with_the_runs(model_dir, tmp_path, caplog):
    """The run's permutation.safetensors decides which channels a width keeps: an export made with
    another order is stale; export and eval of the run use the run's order, not the checkpoint's."""
    import numpy as np

    from actors.permutation import Permutation, checkpoint_permutation

    narrow = Mask().with_mlp_width(0, 24)
    run = make_run(tmp_path / "run", model_dir, narrow, exported=narrow)
    own = checkpoint_permutation(model_dir)
    assert run.stale_artefacts() == []
    rng = np.random.default_rng(0)
    other = Permutation(own.checkpoint, tuple(rng.permutation(len(o)) for o in own.mlp), own.units)
    run.write_permutation(other)  # the run searched with this order
    assert any("another order than the run's permutation.safetensors" in p for p in run.stale_artefacts())
    blocks_only = make_run(tmp_path / "blocks", model_dir, EARLY, exported=EARLY)
    blocks_only.write_permutation(other)
    assert blocks_only.stale_artefacts() == []  # without widths the order changes nothing

    with caplog.at_level(logging.WARNING, logger="rayprune"):
        target = load_target(str(run.path))
    assert target.kind == "run (masked in memory)"
    from pathlib import Path

    from safetensors.torch import load_file

    gate = load_file(str(Path(model_dir) / "model.safetensors"))["model.layers.0.mlp.gate_proj.weight"]
    assert (target.model.model.layers[0].mlp.gate_proj.weight == gate[other.mlp[0][:24]]).all()
    assert cli.main(["export", str(run.path)]) == 0
    assert run.stale_artefacts() == []
    assert json.loads(run.file("model/config.json").read_text())["rayprune"]["reordered"] == other.tag


@pytest.mark.parametrize("content, message", [("{not json", "path.json cannot be read"),
                                              ('{"steps": 5}', "is not a removal path")])
def test_a_broken_path_json_is_named(tmp_path, capsys, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "path.json").write_text(content)
    assert cli.main(["report", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "run" / "path.json") in err


def test_a_refused_driver_leaves_the_holders_pid(tmp_path):
    holder = RunDir(tmp_path / "run").lock()
    try:
        with pytest.raises(RunDirectoryBusy):
            RunDir(tmp_path / "run").lock()
        assert (tmp_path / "run" / ".lock").read_text() == str(os.getpid())
    finally:
        holder.unlock()


def config(seed: int, target: float) -> Config:
    data = DataConfig(calibration=WindowsConfig(sequences=4, length=24, seed=seed))
    return Config(name="run", model="m", data=data, search=SearchConfig(target_ratio=target))


def test_a_changed_seed_keeps_the_earlier_path_as_history(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    dump_yaml(config(0, 0.1), run.file("config.yaml"))
    run.write_path(path_of(EARLY))
    assert run.keep_history(config(0, 0.3)) == []  # a larger target extends the same path
    assert run.has_path()
    assert run.keep_history(config(7, 0.3)) == ["data.calibration.seed"]
    assert not run.has_path()
    (kept,) = (run.path / "history").iterdir()
    assert json.loads((kept / "path.json").read_text())["steps"][0]["mask"] == EARLY.to_dict()
    assert "seed: 0" in (kept / "config.yaml").read_text()


def test_overrides_may_follow_options():
    args = cli.parse_args(["run", "c.yaml", "--no-progress", "search.target_ratio=0.2"])
    assert args.no_progress and args.overrides == ["search.target_ratio=0.2"]
    with pytest.raises(SystemExit):
        cli.parse_args(["run", "c.yaml", "--no-such-flag"])


def test_report_and_eval_accept_a_uri(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    run = make_run(tmp_path / "bucket" / "run", model_dir, EARLY, LATE, exported=LATE)
    uri = f"file://{run.path}"
    run.file("report.md").unlink(missing_ok=True)
    assert cli.main(["report", uri]) == 0
    assert run.file("report.md").is_file()  # written in the staging copy, mirrored back
    assert cli.main(["eval", uri, "--sequences", "2", "--length", "16", "--corpus",
                     str(_corpus(tmp_path)), "--json"]) == 0
    assert cli.main(["report", f"file://{tmp_path / 'nothing'}"]) == 2


def _corpus(tmp_path):
    from tests.tiny import write_corpus

    return write_corpus(tmp_path / "corpus.txt")


def test_a_key_an_older_rayprune_did_not_write_is_not_a_change(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    dump_yaml(config(0, 0.1), run.file("config.yaml"))
    older = [line for line in run.file("config.yaml").read_text().splitlines() if not line.startswith("dtype:")]
    run.file("config.yaml").write_text("\n".join(older) + "\n")  # written before the dtype key existed
    run.write_path(path_of(EARLY))
    assert run.keep_history(config(0, 0.3)) == [] and run.has_path()


def test_a_corrupt_permutation_file_is_named_and_computed_again(model_dir, tmp_path, caplog):
    from actors.permutation import checkpoint_permutation

    run = make_run(tmp_path / "run", model_dir, EARLY)
    assert run.read_permutation() is None  # a run from before stored orders
    permutation = checkpoint_permutation(model_dir)
    run.write_permutation(permutation)
    assert run.read_permutation().digest == permutation.digest
    data = bytearray(run.file("permutation.safetensors").read_bytes())
    data[-3] ^= 0x10
    run.file("permutation.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rayprune"):
        assert run.read_permutation() is None
    assert "permutation.safetensors is corrupt" in caplog.text and "computing the order again" in caplog.text
    run.write_permutation(permutation)  # what the campaign does with the order its pool computed
    assert run.read_permutation().digest == permutation.digest
