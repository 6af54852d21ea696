"""Model presets, resolution, loading and fingerprints.

Fast tests use fake directories; the slow test converts SmolLM2-135M once per machine into the
real cache (``$RAYPRUNE_CACHE`` or ``~/.cache/rayprune``) and checks it against pinned figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from actors import models
from actors.fingerprint import model_fingerprint
from actors.models import PRESETS, ModelNotFound, cache_dir, read_model_config, resolve_model
from search_spaces import Arch, dense_params

SMOLLM2_PARAMS = 134_515_008
ARCH_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
    "rope_parameters", "max_position_embeddings", "attention_bias", "mlp_bias", "hidden_act",
)
REPO = Path(__file__).resolve().parents[2]


def _fake_model_dir(path: Path, weights: bytes = b"w" * 100, config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama", "hidden_size": 8}))
    (path / "model.safetensors").write_bytes(weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )


# --------------------------------------------------------------------------- config


def test_preset_config_is_read_without_torch():
    code = (
        "import json, sys\n"
        "from actors.models import read_model_config\n"
        "config = read_model_config('smollm2-135m')\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'layers': config['num_hidden_layers']}))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"torch": False, "layers": 30}


def test_preset_describes_smollm2_135m():
    config = read_model_config("smollm2-135m")
    arch = Arch.from_hf_config(config)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert (arch.head_dim, arch.intermediate_size, arch.vocab_size, arch.tie_embeddings) == (64, 1536, 49152, True)
    assert dense_params(arch) == SMOLLM2_PARAMS


def test_read_model_config_returns_a_copy():
    read_model_config("smollm2-135m")["hidden_size"] = 1
    assert PRESETS["smollm2-135m"]["hidden_size"] == 576


def test_read_model_config_from_local_directory(tmp_path):
    path = _fake_model_dir(tmp_path / "m", config={"model_type": "llama", "hidden_size": 8})
    assert read_model_config(str(path)) == {"model_type": "llama", "hidden_size": 8}


@pytest.mark.parametrize("spec", ["/no/such/model", "./missing-model", "~/missing-model-dir", "smollm2-135M"])
def test_missing_model_names_the_path_and_the_accepted_forms(spec):
    with pytest.raises(ModelNotFound) as caught:
        read_model_config(spec)
    message = str(caught.value)
    assert spec in message and "does not exist" in message
    assert "smollm2-135m" in message and "local Hugging Face directory" in message and "hub id" in message
    assert isinstance(caught.value, ValueError)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        read_model_config(str(tmp_path))


def test_unreachable_hub_id_raises_model_not_found(tmp_path):
    code = (
        "from actors.models import ModelNotFound, read_model_config\n"
        "try:\n"
        "    read_model_config('no-such-org/no-such-model')\n"
        "except ModelNotFound as err:\n"
        "    print('ModelNotFound', err)\n"
    )
    result = _run_python(code, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ModelNotFound") and "no-such-org/no-such-model" in result.stdout


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("RAYPRUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rayprune"


# --------------------------------------------------------------------------- resolution


def test_resolve_local_directory(tmp_path):
    path = _fake_model_dir(tmp_path / "m")
    assert resolve_model(str(path)) == path


def test_resolve_rejects_a_directory_without_safetensors(tmp_path):
    path = _fake_model_dir(tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelNotFound, match=r"safetensors"):
        resolve_model(str(path))


def test_preset_is_converted_once_under_concurrency(monkeypatch, tmp_path):
    """Two threads race to resolve the preset: one converts, both get the same complete directory."""
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path))
    calls: list[Path] = []

    def fake_convert(name: str, out: Path) -> None:
        calls.append(out)
        _fake_model_dir(out)

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("smollm2-135m"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    target = tmp_path / "models" / "smollm2-135m"
    assert results == [target, target] and len(calls) == 1
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]  # staging cleaned up
    assert resolve_model("smollm2-135m") == target and len(calls) == 1  # cached afterwards


def test_publish_keeps_the_winner_of_a_rename_race(tmp_path):
    winner = _fake_model_dir(tmp_path / "target", weights=b"winner")
    loser = _fake_model_dir(tmp_path / ".staging", weights=b"loser")
    models._publish(loser, winner)
    assert (winner / "model.safetensors").read_bytes() == b"winner"


def test_publish_replaces_a_damaged_directory(tmp_path):
    damaged = tmp_path / "target"
    damaged.mkdir()
    (damaged / "config.json").write_text("{}")  # no weights, no tokenizer
    staging = _fake_model_dir(tmp_path / ".staging", weights=b"new")
    models._publish(staging, damaged)
    assert (damaged / "model.safetensors").read_bytes() == b"new"


# --------------------------------------------------------------------------- the driver's tokenizer: no weights


def _recording_hub(monkeypatch, snapshot: Path) -> list[tuple[str, list[str]]]:
    """``huggingface_hub.snapshot_download`` replaced: records (repo, allow_patterns), returns ``snapshot``."""
    import huggingface_hub

    calls: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id: str, *, allow_patterns: list[str], **kwargs) -> str:
        calls.append((repo_id, list(allow_patterns)))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_resolve_tokenizer_takes_a_directory_without_weights(tmp_path):
    path = _fake_model_dir(tmp_path / "m")
    (path / "model.safetensors").unlink()
    assert models.resolve_tokenizer(str(path)) == path
    with pytest.raises(ModelNotFound, match="safetensors"):
        resolve_model(str(path))  # a replica still needs them
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFound, match="lacks tokenizer files .* which the tokenizer needs"):
        models.resolve_tokenizer(str(path))


def test_a_hub_tokenizer_is_fetched_without_any_weight(tmp_path, monkeypatch):
    snapshot = _fake_model_dir(tmp_path / "snapshot")
    (snapshot / "model.safetensors").unlink()  # what the patterns below fetch
    calls = _recording_hub(monkeypatch, snapshot)
    assert models.resolve_tokenizer("org/model") == snapshot
    [(repo, patterns)] = calls
    assert repo == "org/model" and {"config.json", "tokenizer*"} <= set(patterns)
    assert "*" not in patterns
    assert not [p for p in patterns if "safetensors" in p or p.endswith((".bin", ".pt", ".gguf"))]
    (snapshot / "model.safetensors").write_bytes(b"w")
    assert resolve_model("org/model") == snapshot  # a replica's resolution asks for the weights
    assert "*.safetensors" in calls[-1][1]


def test_drawing_a_campaigns_windows_fetches_no_weights(tmp_path, monkeypatch):
    from orchestrator.data.campaign_windows import campaign_windows
    from tests.tiny import char_tokenizer, tiny_campaign_config, tiny_config, tiny_run_setup

    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshot"  # config and tokenizer only: all the hub patterns fetch
    tiny_config("llama").save_pretrained(snapshot)
    char_tokenizer().save_pretrained(snapshot)
    calls = _recording_hub(monkeypatch, snapshot)

    def weights(spec: str) -> Path:
        raise AssertionError(f"the driver resolved the weights of {spec}")

    monkeypatch.setattr(models, "resolve_model", weights)
    config = tiny_campaign_config(tiny_run_setup(tmp_path), "hub", model="org/tiny", **{"search.target_ratio": 0.1})
    windows = campaign_windows(config)
    assert windows["calibration"].shape == (4, 24) and windows["evaluation"].shape == (3, 32)
    assert [repo for repo, _ in calls] == ["org/tiny"] and not any("safetensors" in p for p in calls[0][1])


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable_and_ignores_transformers_version(tmp_path):
    a = _fake_model_dir(tmp_path / "a", config={"model_type": "llama", "transformers_version": "5.0"})
    b = _fake_model_dir(tmp_path / "b", config={"transformers_version": "5.24", "model_type": "llama"})
    assert model_fingerprint(a) == model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 64


@pytest.mark.parametrize("change", ["config", "last_bytes", "first_bytes", "size", "new_shard"])
def test_fingerprint_changes_with_the_model(tmp_path, change):
    weights = bytes(range(256)) * 12_000  # about 3 MiB: head, middle and tail differ
    path = _fake_model_dir(tmp_path / "m", weights=weights)
    before = model_fingerprint(path)
    if change == "config":
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    elif change == "last_bytes":
        (path / "model.safetensors").write_bytes(weights[:-1] + b"\x00")
    elif change == "first_bytes":
        (path / "model.safetensors").write_bytes(b"\xff" + weights[1:])
    elif change == "size":
        (path / "model.safetensors").write_bytes(weights + b"\x00")
    else:
        (path / "model-00002.safetensors").write_bytes(b"more")
    assert model_fingerprint(path) != before


def test_fingerprint_needs_safetensors(tmp_path):
    path = _fake_model_dir(tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="safetensors"):
        model_fingerprint(path)


# --------------------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M converted once per machine into the stable cache (about 30-40 s the first time)."""
    return resolve_model("smollm2-135m")


@pytest.mark.slow
def test_converted_smollm2_matches_preset_and_pinned_figures(smollm2_dir):
    import math

    import torch

    from actors.models import load_model, load_tokenizer
    from orchestrator.data.corpus import load_documents
    from orchestrator.data.windows import token_windows

    config = json.loads((smollm2_dir / "config.json").read_text())
    preset = PRESETS["smollm2-135m"]
    assert {k: config.get(k) for k in ARCH_KEYS} == {k: preset.get(k) for k in ARCH_KEYS}
    assert "quantization_config" not in config
    model = load_model(smollm2_dir)
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied

    windows = token_windows(load_tokenizer(smollm2_dir), load_documents("wikipedia", "test"), 4, 256, seed=0)
    ids = torch.as_tensor(windows)
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss  # mean NLL over 4 x 255 predicted tokens
    assert 5 < math.exp(loss.item()) < 60  # SPEC 6: about 20 on held-out Wikipedia
    assert model_fingerprint(smollm2_dir) == model_fingerprint(smollm2_dir)
