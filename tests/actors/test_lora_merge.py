"""LoRA on compact models: the targets a pruned model has, and the merge into a loadable compact export.

A fresh LoRA is a no-op (``lora_B`` starts at zero), so every adapter here gets random ``lora_B``
weights first: the merged model must then equal the unmerged PeftModel and differ from the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file

from actors.export import MARKER, UnsafeExportTarget, export_compact, load_pruned
from actors.lora_merge import check_targets, lora_targets, merge_adapter
from actors.models import load_tokenizer
from search_spaces import Mask
from search_spaces.arch import UnsupportedArchitecture
from tests.emulation import checkpoint_saver
from tests.tiny import tiny_config

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION, MLP = set(ALL[:4]), set(ALL[4:])
#: Attention removed in layers 0 and 3 and narrowed in 1, MLP removed in 2 and narrowed in 0 and 3.
MASK = Mask(attn_removed={0, 3}, mlp_removed={2}, head_units={1: 1}, mlp_width={0: 16, 3: 40})
NO_MLP = Mask(mlp_removed={0, 1, 2, 3}, head_units={2: 1})
NO_ATTENTION = Mask(attn_removed={0, 1, 2, 3}, mlp_width={1: 8})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved tiny checkpoints (safetensors + tokenizer): (family, tied) -> directory."""
    return checkpoint_saver(tmp_path_factory.mktemp("checkpoints"))


def adapt(model, targets=ALL, *, r: int = 4, seed: int = 0, dropout: float = 0.05) -> peft.PeftModel:
    """``model`` wrapped in a LoRA whose weights are drawn from ``seed``: ``lora_B`` too (a fresh LoRA,
    B = 0, changes nothing), and ``lora_A`` from the same generator (peft draws it from the global one)."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=list(targets),
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return wrapped.eval()


def adapter_for(compact: Path, directory: Path, targets=ALL, **kwargs) -> peft.PeftModel:
    wrapped = adapt(load_pruned(compact), targets, **kwargs)
    wrapped.save_pretrained(directory)
    return wrapped


def sequences(n: int = 3, t: int = 17, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, 97, (n, t), generator=torch.Generator().manual_seed(seed))


# ---- the merged model is the adapted model, as a compact export ------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_merged_model_loads_with_stock_classes_and_equals_the_peft_model(checkpoints, family, tied, tmp_path):
    compact = export_compact(checkpoints(family, tied), MASK, tmp_path / "run" / "model")
    wrapped = adapter_for(compact, tmp_path / "run" / "recovery" / "adapter")
    ids = sequences()
    with torch.inference_mode():
        expected = wrapped(ids).logits
        base = load_pruned(compact)(ids).logits
    out = merge_adapter(compact, tmp_path / "run" / "recovery" / "adapter", tmp_path / "run" / "recovery" / "model")
    merged = load_pruned(out)
    assert type(merged).__name__.endswith("ForCausalLM") and type(merged).__module__.startswith("transformers.models.")
    assert not any("lora" in name for name in merged.state_dict())
    with torch.inference_mode():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the adapter mattered
    prompt = ids[:1, :6]
    with torch.inference_mode():
        generated = merged.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 11) and torch.equal(generated[:, :6], prompt)
    if tied:
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        assert "lm_head.weight" not in load_file(out / "model.safetensors")

    config = json.loads((out / "config.json").read_text())
    source = json.loads((compact / "config.json").read_text())
    entry = config["rayprune"]
    assert entry["mask"] == MASK.to_dict() and entry["params"] == source["rayprune"]["params"]
    assert {k: entry["recovery"][k] for k in ("method", "r", "alpha", "targets")} == {
        "method": "lora", "r": 4, "alpha": 8, "targets": ALL}
    assert (out / entry["recovery"]["adapter"]).resolve() == (tmp_path / "run" / "recovery" / "adapter").resolve()
    assert (out / MARKER).is_file() and (out / "pruning_config.json").read_text() == (compact / "pruning_config.json").read_text()
    assert load_tokenizer(out)("ab").input_ids == load_tokenizer(compact)("ab").input_ids


def test_a_bfloat16_merge_is_the_fp32_merge_cast(checkpoints, tmp_path):
    compact = export_compact(checkpoints("qwen2"), MASK, tmp_path / "model")
    adapter_for(compact, tmp_path / "adapter")
    full = load_file(merge_adapter(compact, tmp_path / "adapter", tmp_path / "fp32") / "model.safetensors")
    out = merge_adapter(compact, tmp_path / "adapter", tmp_path / "bf16", dtype="bfloat16")
    half = load_file(out / "model.safetensors")
    assert half.keys() == full.keys()
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_pruned(out).model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merging_again_replaces_the_earlier_merge_and_a_merge_of_a_merge_keeps_the_history(checkpoints, tmp_path):
    compact = export_compact(checkpoints("llama"), MASK, tmp_path / "model")
    adapter_for(compact, tmp_path / "a", seed=1)
    adapter_for(compact, tmp_path / "b", seed=2)
    first = merge_adapter(compact, tmp_path / "a", tmp_path / "merged")
    before = load_file(first / "model.safetensors")
    again = merge_adapter(compact, tmp_path / "b", tmp_path / "merged")  # an earlier merge is an export: replaced
    after = load_file(again / "model.safetensors")
    assert not torch.equal(before["model.layers.1.self_attn.q_proj.weight"], after["model.layers.1.self_attn.q_proj.weight"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    adapter_for(again, tmp_path / "c", seed=3)
    twice = merge_adapter(again, tmp_path / "c", tmp_path / "twice")
    recovery = json.loads((twice / "config.json").read_text())["rayprune"]["recovery"]
    assert recovery["adapter"] == "../c" and recovery["previous"]["adapter"] == "../b"


# ---- LoRA targets of pruned models ----------------------------------------------------------------------------
@pytest.mark.parametrize("mask,left", [(Mask(), ATTENTION | MLP), (MASK, ATTENTION | MLP), (NO_MLP, ATTENTION),
                                       (NO_ATTENTION, MLP)], ids=["dense", "pruned", "no-mlp", "no-attention"])
def test_targets_from_the_config_alone_and_from_the_model_agree(checkpoints, mask, left, tmp_path):
    compact = export_compact(checkpoints("mistral"), mask, tmp_path / "model")
    model = load_pruned(compact)
    assert lora_targets(compact) == lora_targets(compact / "config.json") == lora_targets(model.config) == left
    assert lora_targets(model) == left
    assert lora_targets(adapt(model, sorted(left))) == left  # adapted layers count by their own names


def test_every_mlp_removed_names_the_missing_targets_and_lora_still_merges_on_what_is_left(checkpoints, tmp_path):
    compact = export_compact(checkpoints("llama"), NO_MLP, tmp_path / "model")
    for source in (compact, load_pruned(compact)):
        with pytest.raises(ValueError) as error:
            check_targets(source, ALL)
        message = str(error.value)
        assert "gate_proj, up_proj, down_proj not in the model" in message
        assert "every MLP block was removed" in message and "q_proj, k_proj, v_proj, o_proj" in message
    assert check_targets(compact, ["q_proj", "o_proj"]) == {"q_proj", "o_proj"}
    wrapped = adapter_for(compact, tmp_path / "adapter", targets=sorted(ATTENTION))
    ids = sequences(seed=8)
    with torch.inference_mode():
        expected = wrapped(ids).logits
        got = load_pruned(merge_adapter(compact, tmp_path / "adapter", tmp_path / "merged"))(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_check_targets_errors():
    dense = tiny_config("qwen2").to_dict()
    assert check_targets(dense, ALL) == set(ALL)
    with pytest.raises(ValueError, match=r"LoRA target qkv_proj not in the model \(a target is the name of a Linear"):
        check_targets(dense, ["q_proj", "qkv_proj"])
    with pytest.raises(ValueError, match="embed_tokens, lm_head not in the model"):
        check_targets(dense, ["lm_head", "embed_tokens"])  # the head and embedding are never targets
    with pytest.raises(ValueError, match="no LoRA targets given"):
        check_targets(dense, [])
    with pytest.raises(UnsupportedArchitecture, match="model_type 'gpt2'"):
        check_targets({**dense, "model_type": "gpt2"}, ALL)
    with pytest.raises(ValueError, match="cannot read the model config"):
        check_targets("/nonexistent/model", ALL)


# ---- what a merge refuses ------------------------------------------------------------------------------------
def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_a_merge_refuses_to_overwrite_the_model_or_the_adapter_and_bad_input(checkpoints, tmp_path):
    compact = export_compact(checkpoints("llama"), MASK, tmp_path / "model")
    adapter_for(compact, tmp_path / "adapter")
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeExportTarget, match="is the source model"):
        merge_adapter(compact, tmp_path / "adapter", compact)
    with pytest.raises(UnsafeExportTarget, match="holds the adapter"):
        merge_adapter(compact, tmp_path / "adapter", tmp_path / "adapter")
    with pytest.raises(UnsafeExportTarget, match="holds the adapter"):
        merge_adapter(compact, tmp_path / "adapter", tmp_path)
    with pytest.raises(ValueError, match="merge dtype 'int8'"):
        merge_adapter(compact, tmp_path / "adapter", tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match="is not a saved LoRA adapter"):
        merge_adapter(compact, tmp_path / "model", tmp_path / "out")
    with pytest.raises(ValueError, match="not a rayprune export"):
        merge_adapter(checkpoints("llama"), tmp_path / "adapter", tmp_path / "out")
    other = export_compact(checkpoints("llama"), NO_MLP, tmp_path / "other")  # same module names, other widths
    with pytest.raises(ValueError, match="does not fit the compact model"):
        merge_adapter(other, tmp_path / "adapter", tmp_path / "out")
    fewer = export_compact(checkpoints("llama"), Mask(attn_removed={0, 1, 3}, mlp_removed={2}, mlp_width={0: 16, 3: 40}),
                           tmp_path / "fewer")  # MASK without the attention of layer 1
    with pytest.raises(ValueError, match="modules the compact model does not have"):
        merge_adapter(fewer, tmp_path / "adapter", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if k.split("/")[0] in ("model", "adapter")} == before


# ---- LoRA training on a bf16 compact model spread over two emulated GPUs --------------------------------------
#: Blocks removed on both sides of the device boundary (layers 0-1 on cuda:0, 2-3 on cuda:1), widths on both.
EMULATED_MASK = Mask(mlp_removed={1}, attn_removed={2}, head_units={0: 1}, mlp_width={3: 24})


def _lora_step(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of the causal LM loss; the loss and the LoRA gradients (on the CPU)."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_on_a_bf16_compact_model_over_two_emulated_gpus(checkpoints, tied, tmp_path):
    """What a GPU worker with 2 GPUs trains: the compact model in bf16 dispatched by accelerate over
    both GPUs, a LoRA on every projection. Each adapter sits on its layer's GPU in fp32 (peft's
    ``autocast_adapter_dtype``), forward and backward run without mixing devices (the harness raises
    on a mix in the forward; the backward runs in autograd's engine, which the harness does not see
    op by op, on the devices of the forward's tensors), and loss and gradients are a bf16 CPU run's."""
    from tests.actors.test_devices_paths import accelerate_map, emulated_gpus
    from tests.emulation import device_of, mixes

    compact = export_compact(checkpoints("llama", tied), EMULATED_MASK, tmp_path / "model", dtype="bfloat16")
    ids = sequences(2, 12, seed=9)
    expected_loss, expected_grads = _lora_step(adapt(load_pruned(compact), seed=4, dropout=0.0).train(), ids)
    with emulated_gpus(2) as mode:
        model = adapt(load_pruned(compact, device_map=accelerate_map(2, tied)), seed=4, dropout=0.0).train()
        layers = model.get_base_model().model.layers
        for layer in layers:
            for proj in [m for m in layer.modules() if hasattr(m, "lora_A")]:
                base, a, b = proj.base_layer.weight, proj.lora_A["default"].weight, proj.lora_B["default"].weight
                assert base.dtype == torch.bfloat16 and not base.requires_grad
                assert a.dtype == b.dtype == torch.float32 and a.requires_grad
                assert device_of(a) == device_of(b) == device_of(base)
        assert device_of(layers[0].self_attn.q_proj.lora_A["default"].weight) == "cuda:0"
        assert device_of(layers[3].mlp.down_proj.lora_B["default"].weight) == "cuda:1"
        checked = mode.ops_checked
        loss, grads = _lora_step(model, ids.to("cuda:0"))
        assert mode.ops_checked > checked + 100  # the forward really ran under the emulation
        mode.register(layers[3].mlp.down_proj.lora_A["default"].weight, "cuda:0")  # a planted mix is caught
        with mixes():
            model(input_ids=ids.to("cuda:0"))
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * (3 * 4 + 3 * 3)  # A and B of 3 attentions, 3 MLPs
    assert loss == pytest.approx(expected_loss, rel=1e-5)  # bitwise equal today; the paths may differ
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)  # random lora_B: A learns too
