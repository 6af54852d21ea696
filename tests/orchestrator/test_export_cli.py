"""`rayprune export`: from a run directory (any step of its path) and from a MultiPruner pruning_config.json."""

from __future__ import annotations

import json

import pytest
import torch

from actors.export import load_pruned
from actors.forward import LeanDecoder
from tests.tiny import reorder_by_l1_
from orchestrator.cli import main
from search_spaces import Block, Mask, param_count
from search_spaces.pruning_config import mask_to_pruning_config
from tests.tiny import save_tiny, tiny_arch, tiny_model

ARCH = tiny_arch("llama")
MASKS = [Mask().remove(Block(1, "attn")),
         Mask().remove(Block(1, "attn")).with_mlp_width(0, 24).with_heads(2, 1)]


def masked_logits(mask: Mask, ids: torch.Tensor) -> torch.Tensor:
    """The L1-reordered dense model under ``mask``: what every export must reproduce."""
    with torch.inference_mode():
        return LeanDecoder(reorder_by_l1_(tiny_model("llama"), ARCH), ARCH).forward_logits(ids, mask)


def exported(out) -> tuple[dict, torch.Tensor]:
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return json.loads((out / "config.json").read_text())["rayprune"], load_pruned(out)(ids).logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("export") / "model")


def test_a_pruning_config_applied_to_its_model(model_dir, tmp_path, capsys):
    mask = MASKS[1]
    config = tmp_path / "pruning_config.json"
    config.write_text(json.dumps(mask_to_pruning_config(mask, ARCH)))
    out = tmp_path / "compact"
    assert main(["export", model_dir, "--pruning-config", str(config), "--out", str(out), "--check"]) == 0
    assert f"{param_count(mask, ARCH):,} parameters" in capsys.readouterr().out
    meta, logits = exported(out)
    assert Mask.from_dict(meta["mask"]) == mask and meta["params"] == param_count(mask, ARCH)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits, masked_logits(mask, ids), atol=1e-5, rtol=0)


def test_any_step_of_a_run(model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"name: run\nmodel: {model_dir}\n")
    (run / "path.json").write_text(json.dumps({"steps": [
        {"step": k, "kind": "attn", "layer": 1, "ppl": 1.0, "ratio": 0.1, "mask": m.to_dict()}
        for k, m in enumerate(MASKS, 1)]}))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    assert main(["export", str(run), "--step", "1"]) == 0
    assert main(["export", str(run)]) == 0
    for out, mask in ((run / "model-step-1", MASKS[0]), (run / "model", MASKS[1])):
        meta, logits = exported(out)
        assert Mask.from_dict(meta["mask"]) == mask
        torch.testing.assert_close(logits, masked_logits(mask, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("argv, message", [
    (["--step", "7"], "step 7 is not on the path"),
    (["--pruning-config", "{bad}"], "give --out DIR"),
])
def test_bad_requests_get_one_clear_error(model_dir, tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"name: run\nmodel: {model_dir}\n")
    (run / "path.json").write_text(json.dumps({"steps": []}))
    assert main(["export", str(run), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_model_directory_is_not_a_run_and_a_bad_config_names_its_problem(model_dir, tmp_path, capsys):
    assert main(["export", model_dir]) == 2
    assert "has no path.json" in capsys.readouterr().err
    bad = tmp_path / "pruning_config.json"
    bad.write_text(json.dumps({"pruned_attn_idx": [9]}))
    assert main(["export", model_dir, "--pruning-config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "pruned_attn_idx: layer 9 is outside 0..3" in capsys.readouterr().err
