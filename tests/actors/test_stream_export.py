"""The streamed export (``actors.stream_export``): the in-memory export's tensors bit for bit, without
the dense model in memory.

Every case compares ``export_compact`` (streamed) with the in-memory route it replaced
(``compact_model`` + ``save_pretrained``): the same safetensors tensors in the same dtype, bit for
bit, the same config.json and generation_config.json, and the same logits from ``load_pruned``.
The slow test measures the peak resident memory of exporting the real SmolLM2-135M.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from actors.export import compact_model, export_compact, load_pruned
from actors.models import read_model_config
from actors.permutation import checkpoint_permutation
from search_spaces import Arch, Mask, param_count
from tests.tiny import char_tokenizer, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[2]
MACHINE_CACHE = os.environ.get("RAYPRUNE_CACHE")  # where the converted SmolLM2 lives (before own_cache)
BLOCKS = Mask(attn_removed={0}, mlp_removed={2})  # whole blocks gone: their norms and projections too
WIDTHS = Mask(attn_removed={0, 3}, head_units={1: 1}, mlp_width={0: 16, 3: 32})  # narrowed rows and columns
H = 32  # hidden size of the tiny models
REFITS = {BLOCKS: {0: 48, 3: 48}, WIDTHS: {1: 48, 3: 32}}  # MLP layer -> kept width of its down_proj


def save_checkpoint(directory: Path, family: str, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                    shard: str | None = None) -> str:
    """A tiny checkpoint (safetensors + tokenizer): ``tied`` LM head, stored in ``dtype``, in shards of ``shard``."""
    model = tiny_model(family)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype).save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    char_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {
        "llama": save_checkpoint(root / "llama", "llama"),
        "llama-tied": save_checkpoint(root / "llama-tied", "llama", tied=True),
        "qwen2": save_checkpoint(root / "qwen2", "qwen2"),
        "mistral": save_checkpoint(root / "mistral", "mistral"),
        "qwen2-bf16": save_checkpoint(root / "qwen2-bf16", "qwen2", dtype=torch.bfloat16),  # auto = bf16
        "llama-sharded": save_checkpoint(root / "llama-sharded", "llama", shard="20KB"),
    }


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Permutations and fingerprints cached in this test's directory, not the machine's."""
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))


def refits(mask: Mask, seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(H, width, generator=generator) for layer, width in REFITS[mask].items()}


def in_memory_export(model: str, mask: Mask, out: Path, **kwargs) -> Path:
    """The export as it was before streaming: the dense model loaded, reordered, pruned, saved."""
    pruned = compact_model(model, mask, **kwargs)
    pruned.save_pretrained(out)
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same_export(new: Path, old: Path) -> None:
    """Tensor for tensor, bit for bit, in the same dtype; the same config (but the source model's
    name) and generation config."""
    got, expected = tensors(new), tensors(old)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype and got[name].shape == expected[name].shape, name
        assert torch.equal(bits(got[name]), bits(expected[name])), name
    for name in ("config.json", "generation_config.json"):
        got, expected = (json.loads((d / name).read_text()) for d in (new, old))
        for config in (got, expected):
            config.get("rayprune", {}).pop("source", None)
        assert got == expected, name
    assert json.loads((new / "config.json").read_text())["rayprune"].get("source")


def logits(directory: Path, vocab: int = 97) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        return load_pruned(directory)(ids).logits


CASES = [
    ("llama", WIDTHS, "float32", True),
    ("llama", BLOCKS, "bfloat16", False),
    ("llama", Mask(), "float32", False),  # dense: only reordered
    ("llama-tied", WIDTHS, "float32", False),
    ("llama-tied", BLOCKS, "bfloat16", True),
    ("qwen2", WIDTHS, "float32", False),
    ("qwen2", BLOCKS, "float16", True),
    ("mistral", WIDTHS, "bfloat16", False),
    ("mistral", BLOCKS, "auto", False),
    ("qwen2-bf16", WIDTHS, "auto", True),
    ("qwen2-bf16", WIDTHS, "float32", False),
]


@pytest.mark.parametrize("checkpoint, mask, dtype, tuned", CASES,
                         ids=[f"{c}-{'widths' if m == WIDTHS else 'blocks' if m == BLOCKS else 'dense'}-{d}"
                              f"{'-tuned' if t else ''}" for c, m, d, t in CASES])
def test_the_streamed_export_equals_the_in_memory_export(checkpoints, tmp_path, checkpoint, mask, dtype, tuned):
    model = checkpoints[checkpoint]
    kwargs = {"dtype": dtype, "tuned": refits(mask) if tuned else None}
    new = export_compact(model, mask, tmp_path / "streamed", **kwargs)
    old = in_memory_export(model, mask, tmp_path / "in-memory", **kwargs)
    assert_same_export(new, old)
    arch = Arch.from_hf_config(read_model_config(model))
    assert json.loads((new / "config.json").read_text())["rayprune"]["params"] == param_count(mask, arch)
    assert ("lm_head.weight" in tensors(new)) == (not arch.tie_embeddings)
    assert torch.equal(logits(new), logits(old))
    if tuned:
        for layer, weight in refits(mask).items():
            got = tensors(new)[f"model.layers.{layer}.mlp.down_proj.weight"]
            assert torch.equal(got, weight.to(got.dtype))


def test_a_sharded_checkpoint_exports_into_shards_with_an_index(checkpoints, tmp_path):
    model = checkpoints["llama-sharded"]
    assert len(list(Path(model).glob("*.safetensors"))) > 3  # the source is sharded too
    shard_bytes = 20_000
    new = export_compact(model, WIDTHS, tmp_path / "streamed", shard_bytes=shard_bytes, tuned=refits(WIDTHS))
    old = in_memory_export(checkpoints["llama"], WIDTHS, tmp_path / "in-memory", tuned=refits(WIDTHS))
    assert_same_export(new, old)  # the same weights as from the unsharded checkpoint
    shards = sorted(new.glob("*.safetensors"))
    assert len(shards) > 3 and [s.name for s in shards][0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((new / "model.safetensors.index.json").read_text())
    everything = tensors(new)
    assert index["weight_map"].keys() == everything.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in everything.values())
    assert index["metadata"]["total_parameters"] == param_count(WIDTHS, Arch.from_hf_config(read_model_config(model)))
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            names = list(handle.keys())
            assert all(index["weight_map"][n] == shard.name for n in names)
            size = sum(handle.get_tensor(n).numel() * 4 for n in names)
        assert size <= shard_bytes or len(names) == 1  # a tensor larger than a shard gets one of its own
    assert torch.equal(logits(new), logits(old))


def test_the_export_never_loads_the_dense_model(checkpoints, tmp_path, monkeypatch):
    import transformers

    def loaded(*args, **kwargs):
        raise AssertionError("the export loaded the dense model")

    monkeypatch.setattr("actors.models.load_model", loaded)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loaded)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", loaded)
    out = export_compact(checkpoints["qwen2"], WIDTHS, tmp_path / "streamed")
    assert load_pruned(out) is not None


@pytest.mark.parametrize("tuned, message", [
    ({2: torch.zeros(H, 48)}, "refitted weights given for MLP 2, which the mask removes"),
    ({0: torch.zeros(H, 47)}, r"refitted down_proj of layer 0 has shape \(32, 47\), the pruned layer \(32, 48\)"),
])
def test_bad_refits_are_refused_before_anything_is_written(checkpoints, tmp_path, tuned, message):
    with pytest.raises(ValueError, match=message):
        export_compact(checkpoints["llama"], BLOCKS, tmp_path / "out", tuned=tuned)
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"]


def test_a_checkpoint_that_lacks_a_tensor_is_named(checkpoints, tmp_path):
    from safetensors.torch import save_file

    broken = Path(save_checkpoint(tmp_path / "broken", "llama"))
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    from actors.stream_export import plan_compact

    permutation = checkpoint_permutation(checkpoints["llama"])  # the broken one cannot compute its own
    with pytest.raises(ValueError, match="has no tensor model.layers.1.mlp.up_proj.weight"):
        plan_compact(broken, BLOCKS, Arch.from_hf_config(tiny_config("llama").to_dict()), dtype="float32",
                     permutation=permutation)


def test_a_full_disk_while_streaming_leaves_the_previous_export(checkpoints, tmp_path, monkeypatch):
    import actors.stream_export

    out = export_compact(checkpoints["llama"], BLOCKS, tmp_path / "compact")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = actors.stream_export._write_shard

    def full_disk(path, *args):
        real(path, *args)  # the shard is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(actors.stream_export, "_write_shard", full_disk)
    with pytest.raises(OSError, match="No space left on device") as info:
        export_compact(checkpoints["llama"], WIDTHS, out)
    assert f"the previous {out} is untouched" in str(info.value) and "free disk space" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- peak memory of exporting the real SmolLM2-135M --------------------------------------------
#: What the export imports, for the baseline: the same interpreter, modules and model classes, no work.
IMPORTS = """
import torch, transformers, accelerate, safetensors.torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
import transformers.models.llama.modeling_llama
import actors.export, actors.stream_export, actors.models, actors.permutation, actors.fingerprint, actors.surgery
from search_spaces import Mask
"""
PEAK = """
def peak_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
SMOLLM2_MASK = {"attn_removed": [5, 8, 17], "mlp_removed": [14], "mlp_width": {"3": 1024, "20": 512}}


def peak_of(work: str, cache: str) -> int:
    """VmHWM (the high-water mark of resident memory) of a fresh interpreter that runs ``work``."""
    code = IMPORTS + PEAK + textwrap.dedent(work) + "\nprint('PEAK', peak_bytes())\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAYPRUNE_CACHE": cache})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split("PEAK")[-1])


EXPORT = """
from actors.export import export_compact
export_compact("smollm2-135m", Mask.from_dict({mask!r}), {out!r}, dtype={dtype!r})
"""
IN_MEMORY = """
from actors.export import compact_model
compact_model("smollm2-135m", Mask.from_dict({mask!r}), dtype={dtype!r}).save_pretrained({out!r})
"""


def smollm2_peaks(tmp: Path, dtype: str = "float32", *, in_memory: bool = False) -> dict[str, int]:
    """Baseline and export peaks (bytes) for SmolLM2-135M, the machine's converted preset, with its
    channel order and fingerprint cached first (a campaign's export is handed the run's order)."""
    from actors.models import cache_dir, resolve_model

    cache = str(cache_dir())
    checkpoint_permutation(resolve_model("smollm2-135m"))  # converts once per machine, then caches the order
    peaks = {"baseline": peak_of("", cache),
             "streamed": peak_of(EXPORT.format(mask=SMOLLM2_MASK, out=str(tmp / "streamed"), dtype=dtype), cache)}
    if in_memory:
        peaks["in-memory"] = peak_of(IN_MEMORY.format(mask=SMOLLM2_MASK, out=str(tmp / "old"), dtype=dtype), cache)
    return peaks


@pytest.mark.slow
def test_exporting_smollm2_holds_far_less_than_the_dense_model(tmp_path, monkeypatch):
    from actors.models import resolve_model

    if MACHINE_CACHE is None:  # the machine's converted preset, not own_cache's fresh directory
        monkeypatch.delenv("RAYPRUNE_CACHE")
    else:
        monkeypatch.setenv("RAYPRUNE_CACHE", MACHINE_CACHE)
    dense_fp32 = (resolve_model("smollm2-135m") / "model.safetensors").stat().st_size  # 538 MB
    peaks = smollm2_peaks(tmp_path)
    extra = peaks["streamed"] - peaks["baseline"]
    print(f"\nSmolLM2-135M fp32 export: baseline {peaks['baseline'] / 2**20:.0f} MiB, streamed "
          f"{peaks['streamed'] / 2**20:.0f} MiB (+{extra / 2**20:.0f} MiB), dense fp32 {dense_fp32 / 2**20:.0f} MiB")
    assert extra < dense_fp32 / 2  # the largest tensor (embeddings, 113 MB) and its neighbours, not the model
    assert load_pruned(tmp_path / "streamed") is not None
