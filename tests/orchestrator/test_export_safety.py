"""`rayprune export` never destroys what it did not write, never races a campaign, and fails cleanly.

Each test names the defect it guards (issue "Nothing lost, nothing wrong served", defects 3, 6, 7b):
`--out` deleting a run directory or the source model, two exports sharing one staging directory, and
a full disk leaving a raw traceback and a `.model.tmp` behind.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from safetensors import SafetensorError

from orchestrator.cli import main
from orchestrator.rundir import RunDir
from search_spaces import Block, Mask
from search_spaces.pruning_config import mask_to_pruning_config
from tests.tiny import save_tiny, tiny_arch

MASKS = [Mask().remove(Block(1, "attn")), Mask().remove(Block(1, "attn")).with_mlp_width(0, 24)]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, but the run lock (its holder writes its pid)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def dot_entries(directory: Path) -> list[str]:
    """Staging or moved-aside directories an export left behind (the run lock is expected)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name != ".lock")


def export_mask(out: Path) -> Mask:
    return Mask.from_dict(json.loads((out / "config.json").read_text())["rayprune"]["mask"])


@pytest.fixture
def setup(tmp_path) -> dict[str, Path]:
    """A source model and a finished run of it (``runs/X``: config, path, cache, lock) under tmp_path."""
    model = Path(save_tiny("llama", tmp_path / "models" / "llama"))
    run = tmp_path / "runs" / "X"
    (run / "evals").mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: X\nmodel: {model}\n")
    (run / "path.json").write_text(json.dumps({"steps": [
        {"step": k, "kind": "attn", "layer": 1, "ppl": 1.0, "ratio": 0.1, "mask": m.to_dict()}
        for k, m in enumerate(MASKS, 1)]}))
    (run / "evals" / "part-00000.parquet").write_bytes(b"an hour of evaluations")
    (run / ".lock").write_text("")
    config = tmp_path / "pruning_config.json"
    config.write_text(json.dumps(mask_to_pruning_config(MASKS[0], tiny_arch("llama"))))
    return {"root": tmp_path, "model": model, "run": run, "runs": run.parent, "config": config}


# ---- defect: `--out DIR` deleted DIR, whatever it was ---------------------------------------------------
@pytest.mark.parametrize("source, out, message", [
    ("run", "run", "is a run directory (it holds config.yaml, evals, .lock)"),
    ("run", "runs", "contains the run directory"),
    ("run", "model", "is the source model"),
    ("run", "models", "contains the source model"),
    ("model", "model", "is the source model"),
    ("model", "run", "is a run directory"),
    ("model", "runs", "contains the run directory"),
    ("model", "root", "contains the source model"),
])
def test_out_never_deletes_a_run_directory_or_the_source_model(setup, capsys, source, out, message):
    targets = {**setup, "models": setup["model"].parent}
    before = snapshot(setup["root"])
    argv = (["export", str(setup["run"]), "--step", "1"] if source == "run"
            else ["export", str(setup["model"]), "--pruning-config", str(setup["config"])])
    assert main([*argv, "--out", str(targets[out])]) == 2
    err = capsys.readouterr().err
    assert message in err and f"cannot export to {targets[out].resolve()}" in err and "choose a new --out" in err
    assert snapshot(setup["root"]) == before


def test_a_refused_out_is_refused_before_any_weight_is_loaded(setup, capsys, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before --out was checked")

    monkeypatch.setattr("actors.export.compact_model", loaded)
    monkeypatch.setattr("actors.stream_export.plan_compact", loaded)  # the streamed export's first read
    assert main(["export", str(setup["run"]), "--out", str(setup["run"])]) == 2
    assert "is a run directory" in capsys.readouterr().err


def test_a_non_empty_directory_is_refused_and_earlier_exports_are_replaced(setup, capsys):
    mine = setup["root"] / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    assert main(["export", str(setup["run"]), "--out", str(mine)]) == 2
    assert "not a rayprune export (it holds thesis.tex" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "keep me" and len(list(mine.iterdir())) == 1

    out = setup["root"] / "compact"
    for step, mask in ((1, MASKS[0]), (2, MASKS[1])):  # the second export replaces the first
        assert main(["export", str(setup["run"]), "--step", str(step), "--out", str(out)]) == 0
        assert export_mask(out) == mask and json.loads((out / "rayprune-export.json").read_text()) == {"format": 1}
    assert main(["export", str(setup["run"])]) == 0 and main(["export", str(setup["run"])]) == 0
    assert export_mask(setup["run"] / "model") == MASKS[1]
    assert dot_entries(setup["root"]) == [] and dot_entries(setup["run"]) == []


# ---- defect: a campaign's export and `rayprune export` shared `.model.tmp` -------------------------------
def test_export_into_a_run_waits_for_no_campaign_it_is_refused_while_one_runs(setup, capsys):
    run = setup["run"]
    campaign = RunDir(run).lock()  # what a running campaign holds until it has written model/
    try:
        assert main(["export", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"{run} is locked: a campaign is running there" in err and "wait for it to finish" in err
        assert not (run / "model").exists() and dot_entries(run) == []
        # An --out outside the run directory takes nothing from the campaign: it needs no lock.
        assert main(["export", str(run), "--out", str(setup["root"] / "elsewhere")]) == 0
    finally:
        campaign.unlock()
    assert main(["export", str(run)]) == 0 and export_mask(run / "model") == MASKS[1]


# ---- defect: a full disk gave a raw SafetensorError traceback and left `.model.tmp` behind --------------
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                                   'StorageFull, message: "No space left on device" })')],
                         ids=["oserror", "safetensors"])
def test_a_full_disk_is_one_clear_error_and_the_previous_model_stays(setup, capsys, monkeypatch, error):
    import actors.stream_export

    run = setup["run"]
    assert main(["export", str(run)]) == 0
    capsys.readouterr()
    before = snapshot(run / "model")
    real = actors.stream_export._write_shard

    def full_disk(path, *args):
        real(path, *args)
        raise error

    monkeypatch.setattr(actors.stream_export, "_write_shard", full_disk)
    assert main(["export", str(run), "--step", "2"]) == 2
    err = capsys.readouterr().err
    model = (run / "model").resolve()
    assert f"export to {model} failed: " in err and "No space left on device" in err
    assert f"the previous {model} is untouched" in err and "free disk space" in err
    assert "Traceback" not in err
    assert snapshot(run / "model") == before and dot_entries(run) == []
