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


@pytest.mark.parametrize("name", ["Llama-2-7B", "Meta-Llama-3-8B"])
def test_inspect_gives_the_published_counts_of_multipruners_configs(tmp_path, capsys, name):
    """MultiPruner's published pruning_config.json files (tests/data/multipruner/SOURCE.md) through
    ``rayprune inspect``: the dense and kept counts of their eval.res.json (MultiPruner keeps the
    norm weights of removed blocks; rayprune's kept count is lower by exactly those)."""
    from tests.orchestrator.test_multipruner_published import DATA, PUBLISHED

    config, file, dense, kept = PUBLISHED[name]
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    pruning = DATA / file
    assert cli.main(["inspect", str(model), "--pruning-config", str(pruning), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    data = json.loads(pruning.read_text())
    removed_norms = config["hidden_size"] * (len(data["pruned_attn_idx"]) + len(data["pruned_mlp_idx"]))
    assert figures["dense_params"] == dense
    assert figures["kept_params"] == kept - removed_norms
    assert cli.main(["inspect", str(model), "--pruning-config", str(pruning)]) == 0
    assert f"{kept:,} counting them" in capsys.readouterr().out
