"""The report of a run directory: report.md, curve.png and mask.png from path.json alone."""

from __future__ import annotations

import dataclasses
import json

import pytest

from orchestrator import cli
from orchestrator.report import final_mask, run_arch, write_report
from orchestrator.search.base import Step
from search_spaces import Arch, Block, Mask, dense_params, param_count, ratio

ARCH = Arch(family="llama", num_layers=6, hidden_size=64, intermediate_size=256, num_heads=4, num_kv_heads=2,
            head_dim=16, vocab_size=100, tie_embeddings=True)
PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_path(arch: Arch = ARCH, *, with_arch: bool = True, with_masks: bool = True) -> dict:
    """A MultiPruner-like path: two removals, then an MLP width step and a head step."""
    edits = [("attn", 2, lambda m: m.remove(Block(2, "attn"))), ("mlp", 4, lambda m: m.remove(Block(4, "mlp"))),
             ("mlp_width", 1, lambda m: m.with_mlp_width(1, 128)), ("attn_width", 3, lambda m: m.with_heads(3, 1))]
    mask, steps = Mask(), []
    for number, (kind, layer, edit) in enumerate(edits, 1):
        mask = edit(mask)
        step = Step(number, kind, layer, 10.0 + number, ratio(mask, arch), mask, param_count(mask, arch)).to_dict()
        if not with_masks:
            del step["mask"]
        steps.append(step)
    path = {"dense_ppl": 10.0, "dense_params": dense_params(arch), "target_ratio": 0.25, "steps": steps,
            "heldout": {"dense_ppl": 9.5, "pruned_ppl": 14.25},
            "evaluations": {"evaluated": 40, "cached": 7, "failed": 1}, "seconds": 125.0}
    if with_arch:
        path["arch"] = dataclasses.asdict(arch)
    return path


def write_run(directory, path: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "path.json").write_text(json.dumps(path))


def test_report_with_width_steps(tmp_path):
    run = tmp_path / "run"
    write_run(run, synthetic_path())
    report = write_report(run).read_text()
    for picture in ("curve.png", "mask.png"):
        assert (run / picture).read_bytes().startswith(PNG)
        assert f"]({picture})" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == [
        "(dense)", "attn 2", "mlp 4", "mlp 1 -> 128 ch", "heads 3 -> 1 units"]
    final = synthetic_path()["steps"][-1]
    assert f"| dense | {dense_params(ARCH):,} | 0.0000 | 10.000 | 9.500 |" in report
    assert f"| pruned | {final['params']:,} | {final['ratio']:.4f} | 14.000 | 14.250 |" in report
    assert "| evaluations run | 40 |" in report and "| served from the cache | 7 |" in report
    assert "| failed | 1 |" in report and "2 min 05 s" in report
    assert "MLP narrowed: layer 1 -> 128 ch" in report and "heads narrowed: layer 3 -> 1 units" in report


def test_mask_is_replayed_for_paths_without_mask_entries():
    with_masks, without = synthetic_path(), synthetic_path(with_masks=False)
    assert final_mask(without) == final_mask(with_masks) == Mask.from_dict(with_masks["steps"][-1]["mask"])


def test_arch_falls_back_to_the_configured_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
        "tie_word_embeddings": True}))
    run = tmp_path / "run"
    write_run(run, synthetic_path(with_arch=False))
    (run / "config.yaml").write_text(f"name: run\nmodel: {model}\nsearch: {{method: multipruner, target_ratio: 0.25}}\n")
    assert run_arch(run, json.loads((run / "path.json").read_text())) == ARCH
    assert cli.main(["report", str(run)]) == 0
    assert (run / "mask.png").read_bytes().startswith(PNG)
    assert "method multipruner" in (run / "report.md").read_text()


def test_report_without_any_architecture_skips_the_mask_picture(tmp_path):
    run = tmp_path / "run"
    write_run(run, synthetic_path(with_arch=False))
    report = write_report(run).read_text()
    assert not (run / "mask.png").exists() and "mask.png" not in report
    assert (run / "curve.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("steps", [0, 1])
def test_short_paths(tmp_path, steps):
    path = synthetic_path()
    path["steps"] = path["steps"][:steps]
    run = tmp_path / "run"
    write_run(run, path)
    report = write_report(run).read_text()
    assert ("curve.png" in report) == bool(steps)
    assert (run / "mask.png").is_file()
