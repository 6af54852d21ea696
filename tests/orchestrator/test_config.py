"""The campaign config: defaults, overrides, one error listing every problem, round trip."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.config import (
    IMPLEMENTED_METHODS,
    METHODS,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    SearchConfig,
    WindowsConfig,
)
from orchestrator.config_load import dump_yaml, load_config

SMOLLM2: dict[str, Any] = {  # config.json of SmolLM2-135M, the fields Arch reads
    "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "tie_word_embeddings": True,
}

GOOD = """\
# rayprune run configs/demo.yaml
name: demo
model: smollm2-135m
data:
  corpus: wikipedia
  calibration: {sequences: 8, length: 128, seed: 0}
  evaluation: {sequences: 16, length: 256}
search:
  method: blockpruner
  target_ratio: 0.10
cluster: {actors: 2, cpus_per_actor: 1, gpus_per_actor: 0}
output: {output}
"""


def fake_models(name: str) -> dict[str, Any]:
    """Stands in for actors.models.read_model_config: one good model, one gpt2, else missing."""
    if name == "smollm2-135m":
        return SMOLLM2
    if name == "gpt2":
        return {**SMOLLM2, "model_type": "gpt2"}
    raise ValueError(f"{name!r} is neither a preset, a local directory with config.json, nor a hub id; "
                     f"use e.g. model=smollm2-135m")


@pytest.fixture
def write(tmp_path: Path):
    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).replace("{output}", str(tmp_path / "runs" / "demo")))
        return path

    return write


def test_good_config_loads_with_defaults(write):
    config = load_config(write(GOOD), check_model=fake_models)
    assert config.name == "demo" and config.model == "smollm2-135m"
    assert config.data.calibration == WindowsConfig(sequences=8, length=128, seed=0)
    assert config.data.evaluation == WindowsConfig(sequences=16, length=256, seed=1234)
    assert config.search == SearchConfig(method="blockpruner", target_ratio=0.1, max_steps=None, batch_size=4)
    assert config.cluster == ClusterConfig(actors=2, cpus_per_actor=1.0, gpus_per_actor=0.0,
                                           eval_timeout_s=600.0, max_attempts=3)
    assert isinstance(config.cluster.cpus_per_actor, float)


def test_minimal_config_fills_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["name=mini", "model=smollm2-135m", "search.target_ratio=0.2"])
    assert config == Config(name="mini", model="smollm2-135m", search=SearchConfig(target_ratio=0.2))
    assert config.output == "runs/mini"
    assert config.data == DataConfig() and config.cluster == ClusterConfig()


def test_overrides_change_values(write):
    overrides = ["search.target_ratio=0.25", "search.max_steps=7", "cluster.actors=auto",
                 "cluster.gpus_per_actor=0.5", "data.calibration.seed=3", "data.corpus=hf:tatsu-lab/alpaca:train:text",
                 "data.evaluation={sequences: 4}", "search.max_steps=null", "search.batch_size=2"]
    config = load_config(write(GOOD), overrides)
    assert config.search.target_ratio == 0.25 and config.search.max_steps is None
    assert config.search.batch_size == 2
    assert config.cluster.actors == "auto" and config.cluster.gpus_per_actor == 0.5
    assert config.data.calibration.seed == 3
    assert config.data.corpus == "hf:tatsu-lab/alpaca:train:text"
    assert config.data.evaluation == WindowsConfig(sequences=4, length=256, seed=1234)  # merged, not replaced


def test_exponent_numbers_are_numbers(write):
    assert load_config(write(GOOD), ["search.target_ratio=1e-1"]).search.target_ratio == 0.1


@pytest.mark.parametrize("model, expected", [
    ("missing-model", "'missing-model' is neither a preset"),
    ("gpt2", "model_type 'gpt2' is not supported; rayprune prunes llama, mistral, qwen2"),
])
def test_every_problem_in_one_error(write, model, expected):
    path = write(GOOD.replace("target_ratio: 0.10", "target_ratio: 1.5\n  target_ration: 0.1")
                 .replace("model: smollm2-135m", f"model: {model}"))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["cluster.actors=0", "data.calibration.length=-5", "cluster.bogus=1"],
                    check_model=fake_models)
    message, problems = str(info.value), info.value.problems
    assert len(problems) == 6, message
    assert "search.target_ration: unknown key; did you mean search.target_ratio?" in message
    assert "search.target_ratio 1.5 is not strictly between 0 and 1" in message
    assert "search.target_ratio=0.1" in message  # the fix
    assert "cluster.actors 0 is not a positive integer or 'auto'" in message
    assert "data.calibration.length -5 is not a positive integer" in message
    assert "cluster.bogus: unknown key" in message
    assert [p for p in problems if p.startswith("model: ") and f"'{model}'" in p and expected in p], message


def test_misspelled_keys_get_suggestions(write):
    path = write("nmae: x\nmodel: m\nsearch: {target_ratio: 0.1, methd: blockpruner}\n"
                 "data: {calibraton: {sequences: 2}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "nmae: unknown key; did you mean name?" in message
    assert "search.methd: unknown key; did you mean search.method?" in message
    assert "data.calibraton: unknown key; did you mean data.calibration?" in message
    assert "name: missing" in message


def test_every_method_is_implemented_and_an_unknown_one_says_what_to_use(write):
    assert set(IMPLEMENTED_METHODS) == set(METHODS)  # the "not implemented yet" check has nothing left to refuse
    assert load_config(write(GOOD), ["search.method=sprint"]).search.method == "sprint"
    with pytest.raises(ConfigError, match="search.method 'greedy' is not a search method"):
        load_config(write(GOOD), ["search.method=greedy"])


@pytest.mark.parametrize("override, fragment", [
    ("search.target_ratio=0", "search.target_ratio 0 is not strictly between 0 and 1"),
    ("search.target_ratio=.nan", "is not a finite number"),
    ("search.target_ratio=abc", "search.target_ratio 'abc' is not a number"),
    ("search.max_steps=0", "search.max_steps 0 is not a positive integer"),
    ("search.batch_size=2.5", "search.batch_size 2.5 is not a positive integer"),
    ("data.calibration.sequences=true", "data.calibration.sequences True is not a positive integer"),
    ("data.calibration.seed=-1", "data.calibration.seed -1 is not an integer >= 0"),
    ("cluster.gpus_per_actor=1.5", "above 1 must be a whole number of GPUs"),
    ("cluster.eval_timeout_s=0", "cluster.eval_timeout_s 0 must be > 0"),
    ("cluster.max_attempts=0", "cluster.max_attempts 0 is not a positive integer"),
    ("name=a/b", "name 'a/b' is not a usable directory name"),
    ("data.calibration.windows=nowhere.parquet", "data.calibration.windows 'nowhere.parquet' is not an existing file"),
    ("data.evaluation.windows=x.parquet", "data.evaluation.windows 'x.parquet' is not supported"),
    ("search=3", "search: 3 is not a section"),
    ("search.target_ratio.x=1", "search.target_ratio is a value"),
    ("search.target_ratio", "expected key=value"),
])
def test_bad_values_are_named_with_a_fix(write, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(GOOD), [override])
    assert fragment in str(info.value)


def test_dtype_defaults_to_auto_and_takes_every_dtype(write):
    assert load_config(write(GOOD)).dtype == "auto"
    for dtype in ("auto", "bfloat16", "float16", "float32"):
        assert load_config(write(GOOD), [f"dtype={dtype}"]).dtype == dtype
    assert load_config(write(GOOD + "dtype: bfloat16\n")).dtype == "bfloat16"


@pytest.mark.parametrize("value", ["fp16", "bf16", "float64", "BFloat16", "32", "null", "true"])
def test_bad_dtype_names_the_field_the_value_and_the_choices(write, value):
    with pytest.raises(ConfigError) as info:
        load_config(write(GOOD), [f"dtype={value}"])
    (line,) = [p for p in info.value.problems if p.startswith("dtype")]
    assert "is not a dtype; use one of auto, bfloat16, float16, float32, e.g. dtype=auto" in line
    assert line.startswith(f"dtype {yaml.safe_load(value)!r} ")


def test_windows_file_that_exists_is_accepted(write, tmp_path):
    windows = tmp_path / "calibration.parquet"
    windows.write_bytes(b"PAR1")
    config = load_config(write(GOOD), [f"data.calibration.windows={windows}"])
    assert config.data.calibration.windows == str(windows)


def test_output_under_a_file_is_an_error(write, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="output: .* is not a directory"):
        load_config(write(GOOD), [f"output={tmp_path / 'afile' / 'run'}"])


def test_bad_yaml_and_missing_file_are_config_errors(write, tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write("name: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write("- a\n- b\n"))


def test_dump_and_load_round_trip(write, tmp_path):
    config = load_config(write(GOOD), ["search.max_steps=5", "data.calibration.seed=7", "cluster.actors=auto"],
                         check_model=fake_models)
    path = dump_yaml(config, tmp_path / "runs" / "demo" / "config.yaml")
    assert path.read_text().startswith("# ")  # says how to run it
    assert yaml.safe_load(path.read_text()) == config.to_dict()
    assert load_config(path, check_model=fake_models) == config
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left


SMOL = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


def test_multipruner_settings_are_checked_against_the_model(write):
    path = write(GOOD)
    config = load_config(path, ["search.method=multipruner", "search.split=44:52:4", "search.mlp_group=256"],
                         check_model=lambda m: SMOL)
    assert config.search.split == pytest.approx((0.44, 0.52, 0.04))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["search.method=multipruner", "search.mlp_group=1536", "search.head_group=3"],
                    check_model=lambda m: SMOL)
    message = str(info.value)
    assert "search.mlp_group 1536 must be between 1 and 1535" in message  # MultiPruner's groups need not divide
    assert "search.head_group 3" in message and "GQA" in message
    with pytest.raises(ConfigError, match="summing to 1"):
        load_config(path, ["search.method=multipruner", "search.split=[0.5, 0.3, 0.1]"])


def test_widths_are_for_optuna_and_evolution_and_their_groups_must_divide(write):
    path = write(GOOD)
    config = load_config(path, ["search.method=evolution", "search.widths=true"], check_model=lambda m: SMOL)
    assert config.search.widths and config.search.method == "evolution"
    with pytest.raises(ConfigError, match="search.widths: per-layer widths are searched by optuna and evolution, "
                                          "not blockpruner"):
        load_config(path, ["search.widths=true"], check_model=lambda m: SMOL)
    with pytest.raises(ConfigError, match="search.mlp_group 1000 does not divide the MLP width 1536"):
        load_config(path, ["search.method=evolution", "search.widths=true", "search.mlp_group=1000"],
                    check_model=lambda m: SMOL)


# ---- cluster.gpus_per_actor: auto and cluster.gpu_memory_gb (cluster/replica_size.py resolves them) ----
def test_gpus_per_actor_auto_and_gpu_memory(write):
    config = load_config(write(GOOD), ["cluster.gpus_per_actor=auto"])
    assert config.cluster.gpus_per_actor == "auto" and config.cluster.gpu_memory_gb == "auto"
    config = load_config(write(GOOD), ["cluster.gpus_per_actor=4", "cluster.gpu_memory_gb=80"])
    assert config.cluster.gpus_per_actor == 4.0 and config.cluster.gpu_memory_gb == 80.0
    assert load_config(write(GOOD), ["cluster.gpu_memory_gb=141.5"]).cluster.gpu_memory_gb == 141.5
    yaml_text = GOOD.replace("gpus_per_actor: 0}", "gpus_per_actor: auto, gpu_memory_gb: 80}")
    assert load_config(write(yaml_text)).cluster.gpus_per_actor == "auto"


@pytest.mark.parametrize("override, fragment", [
    ("cluster.gpus_per_actor=many", "cluster.gpus_per_actor 'many' is not a number of GPUs or 'auto'; use e.g. "
                                    "cluster.gpus_per_actor=1 or cluster.gpus_per_actor=auto"),
    ("cluster.gpus_per_actor=Auto", "is not a number of GPUs or 'auto'"),
    ("cluster.gpus_per_actor=-1", "cluster.gpus_per_actor -1 must be >= 0"),
    ("cluster.gpus_per_actor=true", "cluster.gpus_per_actor True is not a number"),
    ("cluster.gpu_memory_gb=0", "cluster.gpu_memory_gb 0 must be > 0; use e.g. cluster.gpu_memory_gb=80"),
    ("cluster.gpu_memory_gb=80GB", "cluster.gpu_memory_gb '80GB' is not a GPU memory in GB or 'auto'; use e.g. "
                                   "cluster.gpu_memory_gb=80 or cluster.gpu_memory_gb=auto"),
])
def test_bad_gpu_settings_get_one_clear_error(write, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(GOOD), [override])
    assert len(info.value.problems) == 1 and fragment in str(info.value)


def test_the_resolved_config_keeps_auto(write, tmp_path):
    config = load_config(write(GOOD), ["cluster.gpus_per_actor=auto"])
    again = tmp_path / "again.yaml"
    dump_yaml(config, again)
    text = again.read_text()
    assert "gpus_per_actor: auto" in text and "gpu_memory_gb: auto" in text
    assert load_config(again).cluster == config.cluster


@pytest.mark.parametrize("value, expected", [("4", 4), ("[4, 8, 16]", (4, 8, 16)), ("4,8", (4, 8)), ("[2]", 2),
                                             ("null", None)])
def test_racing_takes_one_round_or_increasing_rounds(write, tmp_path, value, expected):
    config = load_config(write(GOOD), [f"search.racing.windows={value}"], check_model=fake_models)
    assert config.search.racing.windows == expected
    path = dump_yaml(config, tmp_path / "runs" / "demo" / "config.yaml")
    assert load_config(path, check_model=fake_models) == config  # the resolved config reads back the same


@pytest.mark.parametrize("value", ["[8, 4]", "[4, 4]", "[0, 4]", "[]", "[4, x]", "[4.5, 8]", "true", "four"])
def test_bad_racing_windows_get_one_clear_error(write, value):
    with pytest.raises(ConfigError, match=r"search.racing.windows .* use e.g. search.racing.windows=4"):
        load_config(write(GOOD), [f"search.racing.windows={value}"], check_model=fake_models)


def test_racing_probes_default_to_one_and_refuse_a_negative_count(write):
    assert load_config(write(GOOD), check_model=fake_models).search.racing.probes == 1
    assert load_config(write(GOOD), ["search.racing.probes=0"], check_model=fake_models).search.racing.probes == 0
    with pytest.raises(ConfigError, match=r"search.racing.probes .* use e.g. search.racing.probes=1"):
        load_config(write(GOOD), ["search.racing.probes=-1"], check_model=fake_models)


def test_evolution_first_windows_is_auto_a_count_or_null(write):
    assert load_config(write(GOOD), check_model=fake_models).search.evolution.first_windows == "auto"
    for value, expected in (("4", 4), ("null", None), ("auto", "auto")):
        config = load_config(write(GOOD), [f"search.evolution.first_windows={value}"], check_model=fake_models)
        assert config.search.evolution.first_windows == expected
    with pytest.raises(ConfigError, match="search.evolution.first_windows 0 is not a positive integer, auto or null"):
        load_config(write(GOOD), ["search.evolution.first_windows=0"], check_model=fake_models)
