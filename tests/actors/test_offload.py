"""An offloaded replica is refused right after loading, before any evaluation, saying what it needs.

accelerate keeps the weights of modules a device map sends to ``disk`` (or, on a GPU replica, to
``cpu``) on the meta device; the lean forward reads ``.weight`` directly and fails on them.
"""

from __future__ import annotations

import pytest
import torch

from actors import sizing
from actors.forward import LeanDecoder
from actors.models import load_model
from actors.offload import OffloadedReplica, check_fits, check_not_offloaded, offloaded_modules
from actors.sizing import ReplicaTooLarge, replica_size, weights_bytes
from search_spaces import Mask
from search_spaces.memory import WorkingMemory
from tests.tiny import save_tiny, tiny_arch

MODULES = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)), "model.norm", "model.rotary_emb", "lm_head"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))


def on_cpu_but(**places: str) -> dict[str, str]:
    return {m: places.get(m.replace("model.", "").replace(".", "_"), "cpu") for m in MODULES}


def test_the_lean_forward_fails_on_disk_offloaded_weights(tiny_dir):
    """Without the check: what the refusal prevents (so the check is needed, and its test can fail)."""
    model = load_model(tiny_dir, device_map=on_cpu_but(layers_1="disk"))
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    ids = torch.randint(0, 97, (2, 16))
    assert model(ids).logits.isfinite().all()  # the stock forward goes through accelerate's hooks
    decoder = LeanDecoder(model, tiny_arch("llama"))
    with pytest.raises(NotImplementedError, match="meta"):
        decoder.nll(decoder.run(decoder.embed(ids), Mask()), ids)


def test_an_offloaded_replica_is_refused_with_what_it_needs(tiny_dir, monkeypatch):
    model = load_model(tiny_dir, device_map=on_cpu_but(layers_1="disk", layers_3="disk"))
    assert offloaded_modules(model) == {"model.layers.1": "disk", "model.layers.3": "disk"}
    # No margin, and GPUs of 60% of the model: the advice is 2 or more GPUs, computed like sizing does.
    monkeypatch.setattr(sizing, "MARGIN_BYTES", 0)
    config = model.config.to_dict()
    total = weights_bytes(config, "float32")
    gpu = int(0.6 * total)
    need = replica_size(config, "float32", gpu, WorkingMemory(0, 0, 0), max_gpus=64)
    assert need.gpus >= 2
    with pytest.raises(OffloadedReplica) as err:
        check_not_offloaded(model, gpu_bytes=gpu)
    message = str(err.value)
    assert "model.layers.1 (disk), model.layers.3 (disk)" in message
    assert "no mask was evaluated" in message
    assert "in float32" in message and f"needs {need.gpus} GPUs of {gpu / 1e9:g} GB" in message
    assert "cluster.gpus_per_actor: auto" in message and f"cluster.gpus_per_actor={need.gpus}" in message


def test_a_replica_on_its_own_devices_passes(tiny_dir):
    check_not_offloaded(load_model(tiny_dir))
    check_not_offloaded(load_model(tiny_dir, device_map=on_cpu_but()))  # a CPU replica through accelerate


def test_cpu_entries_of_a_gpu_replica_count_as_offloaded(tiny_dir):
    """On a replica that computes on CUDA, a ``cpu`` entry is offloaded (read from its device map)."""
    model = load_model(tiny_dir)
    model.hf_device_map = {**{m: 0 for m in MODULES}, "model.layers.2": "cpu"}
    assert offloaded_modules(model) == {"model.layers.2": "cpu"}
    model.hf_device_map = {m: "cpu" for m in MODULES}  # a CPU replica: cpu is where it computes
    assert offloaded_modules(model) == {}


def test_the_driver_refuses_before_loading(tiny_dir, monkeypatch):
    monkeypatch.setattr(sizing, "MARGIN_BYTES", 0)
    config = load_model(tiny_dir).config.to_dict()
    total = weights_bytes(config, "float32")
    nothing = WorkingMemory(0, 0, 0)
    assert check_fits(config, "float32", 1, 2 * total, nothing).gpus == 1
    with pytest.raises(ReplicaTooLarge, match=r"a replica on 1 GPU of .* would offload .* needs \d+ GPUs of"):
        check_fits(config, "float32", 1, int(0.6 * total), nothing)


def test_the_evaluator_refuses_before_any_evaluation(tiny_dir):
    """The evaluator runs the check right after loading, so no mask is ever scored by it."""
    from actors.evaluator import Evaluator

    with pytest.raises(OffloadedReplica, match="model.layers.1 \\(disk\\)"):
        Evaluator(tiny_dir, {"calibration": torch.randint(0, 97, (2, 16)).numpy()}, dtype="float32",
                  device_map=on_cpu_but(layers_1="disk"))
