"""The CLI stops bad configs before anything starts, with one error listing every problem."""

from __future__ import annotations

import json

import pytest

from orchestrator import cli


@pytest.fixture
def no_ray(monkeypatch):
    import cluster.session

    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start for a bad config")

    monkeypatch.setattr(cluster.session, "connect", refuse)


def test_bad_config_lists_every_problem(tmp_path, capsys, no_ray):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    config = tmp_path / "bad.yaml"
    config.write_text(f"name: bad\nmodel: {gpt2}\nsearch: {{target_ration: 0.1, target_ratio: 1.5}}\n")
    assert cli.main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "invalid config (3 problems)" in err
    assert "did you mean search.target_ratio" in err
    assert "search.target_ratio 1.5" in err
    assert "gpt2" in err and "llama, mistral, qwen2" in err


def test_missing_model_path_and_ratio_zero(tmp_path, capsys, no_ray):
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\nmodel: ./no/such/model\nsearch: {target_ratio: 0}\n")
    assert cli.main(["run", str(config), "cluster.actorz=2"]) == 2
    err = capsys.readouterr().err
    assert "no/such/model" in err and "does not exist" in err
    assert "search.target_ratio 0" in err
    assert "cluster.actorz" in err and "did you mean cluster.actors" in err


def test_inspect_counts_from_config_json_alone(tmp_path, capsys):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}))
    pruning = tmp_path / "pruning_config.json"
    pruning.write_text(json.dumps({"pruned_attn_idx": [25, 27, 24], "pruned_mlp_idx": [8],
                                   "pruned_attn_width": {"1": 3328}, "pruned_mlp_width": {"2": 5888}}))
    assert cli.main(["inspect", str(model), "--pruning-config", str(pruning), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["dense_params"] == 6_738_415_616
    removed = 3 * (4 * 4096 * 4096 + 4096) + (3 * 4096 * 11008 + 4096) + 6 * 128 * 4096 * 4 + (11008 - 5888) * 3 * 4096
    assert figures["kept_params"] == 6_738_415_616 - removed
