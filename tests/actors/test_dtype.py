"""The ``dtype`` setting in the actor: ``auto`` resolved per device, weights loaded in it (never
upcast), the dtype in the fingerprint, and the export keeping it."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

from actors.evaluator import Evaluator, dtype_suffix, load_device
from actors.fingerprint import model_fingerprint
from actors.models import DTYPES, checkpoint_dtype, resolve_dtype
from search_spaces import Block, Mask
from tests.tiny import save_tiny


# ---- resolve_dtype -------------------------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA checks mocked: ``state["bf16"]`` answers is_bf16_supported; entered devices are recorded."""
    state = {"bf16": True, "entered": [], "kwargs": []}

    def is_bf16_supported(**kwargs):
        state["kwargs"].append(kwargs)
        return state["bf16"]

    @contextlib.contextmanager
    def device(d):
        state["entered"].append(torch.device(d))
        yield

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                         ("float16", torch.float16)])
@pytest.mark.parametrize("device", [None, "cpu", "cuda", "cuda:1", torch.device("cpu")])
def test_explicit_dtypes_are_taken_as_given_on_any_device(fake_cuda, name, dtype, device):
    assert resolve_dtype(name, device) == dtype
    assert fake_cuda["kwargs"] == []  # no CUDA question asked


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu"), "meta"])
def test_auto_is_float32_off_cuda(fake_cuda, device):
    assert resolve_dtype("auto", device) == torch.float32
    assert fake_cuda["kwargs"] == []


def test_auto_is_bfloat16_on_a_cuda_device_with_native_bf16(fake_cuda):
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert fake_cuda["kwargs"] == [{"including_emulation": False}]  # emulated bf16 does not count
    assert resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16
    assert fake_cuda["entered"] == [torch.device("cuda", 1)]  # asked of that device, not the current one


def test_auto_is_float16_on_a_cuda_device_without_bf16(fake_cuda):
    fake_cuda["bf16"] = False
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("auto", "cuda") == torch.float16


def test_auto_works_with_a_torch_whose_check_takes_no_keyword(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


@pytest.mark.parametrize("name", ["fp16", "bf16", "float64", "", "AUTO"])
def test_unknown_dtype_names_the_choices(name):
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16, float16"):
        resolve_dtype(name, "cpu")
    assert set(DTYPES) == {"auto", "float32", "bfloat16", "float16"}


def test_the_config_accepts_exactly_what_the_actor_resolves():
    from orchestrator.config_checks import DTYPES as CONFIG_DTYPES

    assert set(CONFIG_DTYPES) == set(DTYPES)


def test_load_device_reads_the_device_map(monkeypatch):
    assert load_device(None) == "cpu"
    assert load_device("cuda") == load_device("cuda:1") == "cuda"
    assert load_device({"model.embed_tokens": 0, "lm_head": "cpu"}) == "cuda"
    assert load_device({"": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_device("auto") == "cpu"


# ---- the checkpoint's own dtype (export with dtype: auto) ----------------------------------------
@pytest.mark.parametrize("config, expected", [
    ({"dtype": "bfloat16"}, "bfloat16"),
    ({"torch_dtype": "float16"}, "float16"),  # transformers < 4.56 wrote torch_dtype
    ({"torch_dtype": "torch.bfloat16"}, "bfloat16"),
    ({"dtype": "float32"}, "float32"),
    ({}, "float32"),
    ({"dtype": "int8"}, "float32"),
])
def test_checkpoint_dtype_reads_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    assert checkpoint_dtype(str(tmp_path)) == expected


# ---- the evaluator, in process (no Ray) ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("dtype") / "model")


@pytest.fixture(scope="module")
def windows():
    return {"calibration": np.random.default_rng(3).integers(0, 97, size=(4, 24))}


MASKS = [Mask(), Mask().remove(Block(1, "attn")), Mask().remove(Block(2, "mlp")).with_mlp_width(0, 24)]


def _scores(evaluator: Evaluator) -> list[float]:
    rows = evaluator.evaluate("calibration", [m.to_json() for m in MASKS], None)
    return [math.exp(r["nll_sum"] / r["tokens"]) for r in rows]


def test_bf16_evaluator_holds_bf16_weights_and_scores_like_fp32(tiny_dir, windows):
    bf16 = Evaluator(tiny_dir, windows, batch_size=2, dtype="bfloat16")
    fp32 = Evaluator(tiny_dir, windows, batch_size=2, dtype="float32")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}  # loaded so, never upcast
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert bf16.dtype == bf16.info()["dtype"] == "bfloat16"
    ppl16, ppl32 = _scores(bf16), _scores(fp32)
    assert all(math.isfinite(p) and p > 1 for p in ppl16)
    assert ppl16 == pytest.approx(ppl32, rel=0.01)


def test_the_dtype_is_part_of_the_fingerprint_and_fp32_adds_nothing(tiny_dir, windows):
    from actors.permutation import checkpoint_permutation

    old = model_fingerprint(tiny_dir) + "+" + checkpoint_permutation(tiny_dir).tag  # weights + channel order
    fingerprints = {d: Evaluator(tiny_dir, windows, batch_size=2, dtype=d).model_fingerprint
                    for d in ("float32", "bfloat16", "float16", "auto")}
    assert fingerprints["float32"] == old
    assert fingerprints["bfloat16"] == old + "+bfloat16"
    assert fingerprints["float16"] == old + "+float16"
    assert fingerprints["auto"] == old  # auto on a CPU is fp32
    assert len({fingerprints[d] for d in ("float32", "bfloat16", "float16")}) == 3
    assert dtype_suffix("float32") == "" and dtype_suffix("bfloat16") == "+bfloat16"


def test_the_default_dtype_is_auto_and_fp32_on_a_cpu(tiny_dir, windows):
    evaluator = Evaluator(tiny_dir, windows, batch_size=2)
    assert evaluator.dtype == "float32" and evaluator.device.type == "cpu"
    assert not torch.backends.cuda.matmul.allow_tf32  # TF32 is for fp32 on CUDA only


# ---- the export keeps the dtype ------------------------------------------------------------------
def test_export_in_bf16_and_auto_keeps_the_checkpoint_dtype(tiny_dir, tmp_path):
    from actors.export import export_compact, load_pruned

    mask = Mask().remove(Block(1, "attn"))
    out = export_compact(tiny_dir, mask, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in load_pruned(out).parameters()} <= {torch.bfloat16}
    out = export_compact(tiny_dir, mask, tmp_path / "auto", dtype="auto")  # the tiny checkpoint is fp32
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
