"""Compact exports: sliced for real, loadable with stock classes, same logits as the masked model."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from actors.export import export_compact, load_pruned
from actors.forward import LeanDecoder
from actors.surgery import count_parameters
from tests.tiny import reorder_by_l1_
from search_spaces import Mask, param_count
from search_spaces.pruning_config import mask_from_pruning_config
from tests.tiny import save_tiny, tiny_arch, tiny_model

MASKS = [
    Mask(attn_removed={0}, mlp_removed={2}),
    Mask(attn_removed={0, 3}, head_units={1: 1}, mlp_width={0: 16, 3: 32}),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {f: save_tiny(f, root / f) for f in ("llama", "qwen2", "mistral")}


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_export_equals_masked_model(family, mask, model_dirs, tmp_path):
    arch = tiny_arch(family)
    out = export_compact(model_dirs[family], mask, tmp_path / "compact")
    compact = load_pruned(out)
    assert count_parameters(compact) == param_count(mask, arch)
    assert json.loads((out / "pruning_config.json").read_text())["pruned_attn_idx"] == sorted(mask.attn_removed)
    ids = torch.randint(0, arch.vocab_size, (2, 30), generator=torch.Generator().manual_seed(9))
    reordered = reorder_by_l1_(tiny_model(family), arch)
    with torch.inference_mode():
        expected = LeanDecoder(reordered, arch).forward_logits(ids, mask)
        got = compact(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_generate_with_first_attention_removed_uses_the_cache_right(model_dirs, tmp_path):
    arch = tiny_arch("llama")
    mask = MASKS[1]  # attention of layer 0 is gone: the KV cache of layer 0 still counts tokens
    compact = load_pruned(export_compact(model_dirs["llama"], mask, tmp_path / "compact"))
    prompt = torch.randint(2, arch.vocab_size, (1, 7), generator=torch.Generator().manual_seed(10))
    with torch.inference_mode():
        out = compact.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        # Reference: greedy decoding without any cache, one full forward per token.
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, compact(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == ids.tolist()
    with torch.inference_mode():  # callers that ask the cache how many tokens it has seen
        assert compact(prompt, use_cache=True).past_key_values.get_seq_length() == prompt.shape[1]


def test_pruning_config_round_trip_gives_the_same_model(model_dirs, tmp_path):
    arch = tiny_arch("qwen2")
    first = export_compact(model_dirs["qwen2"], MASKS[1], tmp_path / "a")
    mask = mask_from_pruning_config(json.loads((first / "pruning_config.json").read_text()), arch)
    second = export_compact(model_dirs["qwen2"], mask, tmp_path / "b")
    a, b = load_pruned(first).state_dict(), load_pruned(second).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loading_a_dense_directory_says_what_to_do(model_dirs):
    with pytest.raises(ValueError, match="not a rayprune export"):
        load_pruned(model_dirs["llama"])


# ---- never replace what an export did not write ---------------------------------------------------------
MARKER = "rayprune-export.json"  # the file every export writes (its format: JSON {"format": 1})


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes: equal snapshots prove nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def leftovers(parent) -> list[str]:
    """Dot-entries beside the outputs: staging or moved-aside directories an export left behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


def export_mask(out) -> Mask:
    return Mask.from_dict(json.loads((Path(out) / "config.json").read_text())["rayprune"]["mask"])


def foreign_target(kind: str, root: Path, model: str) -> Path:
    """An output directory of ``kind`` that an export must refuse, under ``root``."""
    if kind == "run":
        (root / "run" / "evals").mkdir(parents=True)
        for name in ("config.yaml", "path.json", "evals/part-0.parquet"):
            (root / "run" / name).write_text("keep me")
        return root / "run"
    if kind == "runs":
        (root / "runs" / "X").mkdir(parents=True)
        (root / "runs" / "X" / "config.yaml").write_text("keep me")
        return root / "runs"
    if kind in ("source", "holds-source"):
        return Path(model) if kind == "source" else Path(model).parent
    (root / "out").mkdir()
    if kind == "bare-run":  # a removal path alone: no config, cache or lock, still not to be replaced
        (root / "out" / "path.json").write_text("keep me")
        return root / "out"
    if kind == "legacy-plus":  # an old export's config.json, but a file no export writes beside it
        (root / "out" / "config.json").write_text(json.dumps({"rayprune": {"format": 1}}))
    (root / "out" / "notes.txt").write_text("keep me")
    if kind == "file":
        return root / "out" / "notes.txt"
    return root / "out"


@pytest.mark.parametrize("kind, message", [
    ("run", "is a run directory (it holds config.yaml, evals)"),
    ("runs", "contains the run directory"),
    ("source", "is the source model"),
    ("holds-source", "contains the source model"),
    ("foreign", "is a non-empty directory that is not a rayprune export (it holds notes.txt"),
    ("legacy-plus", "is a non-empty directory that is not a rayprune export (it holds notes.txt"),
    ("file", "is a file, not a directory"),
    ("bare-run", "is a non-empty directory that is not a rayprune export (it holds path.json"),
])
def test_export_refuses_what_it_did_not_write_before_loading_weights(kind, message, tmp_path, monkeypatch):
    model = save_tiny("llama", tmp_path / "src" / "model")
    target = foreign_target(kind, tmp_path, model)
    before = snapshot(tmp_path)

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before the output directory was checked")

    monkeypatch.setattr("actors.export.compact_model", loaded)
    monkeypatch.setattr("actors.stream_export.plan_compact", loaded)  # the streamed export's first read
    with pytest.raises(ValueError, match="choose a new --out") as info:
        export_compact(model, MASKS[0], target)
    assert message in str(info.value) and str(target.resolve()) in str(info.value)
    assert snapshot(tmp_path) == before


def test_export_replaces_an_empty_directory_and_earlier_exports_marked_or_not(model_dirs, tmp_path):
    from actors.export import EXPORT_FILES

    out = tmp_path / "compact"
    out.mkdir()
    export_compact(model_dirs["llama"], MASKS[0], out)
    assert json.loads((out / MARKER).read_text()) == {"format": 1}
    # All an export writes is known, so an unmarked (older) export can be recognised by its files.
    assert all(p.name in EXPORT_FILES or p.name.endswith(".safetensors") for p in out.iterdir())
    export_compact(model_dirs["llama"], MASKS[1], out)
    assert export_mask(out) == MASKS[1]
    (out / MARKER).unlink()  # as exports written before the marker
    export_compact(model_dirs["llama"], MASKS[0], out)
    assert export_mask(out) == MASKS[0] and (out / MARKER).is_file()
    assert leftovers(tmp_path) == []


def test_overlapping_exports_to_one_directory_leave_one_complete_model(model_dirs, tmp_path, monkeypatch):
    """A campaign's export and `rayprune export` of the same run used to share `.model.tmp`: the
    second deleted the first's staging directory, which then became `model/` without config.json."""
    import actors.models

    real, out = actors.models.load_tokenizer, tmp_path / "model"
    overlapped = []

    def load_tokenizer_while_another_export_runs(path):
        if not overlapped:  # the first export has written its weights: the second runs start to end
            overlapped.append(path)
            export_compact(model_dirs["llama"], MASKS[0], out)
        return real(path)

    monkeypatch.setattr(actors.models, "load_tokenizer", load_tokenizer_while_another_export_runs)
    export_compact(model_dirs["llama"], MASKS[1], out)
    assert overlapped and export_mask(out) == MASKS[1]
    assert count_parameters(load_pruned(out)) == param_count(MASKS[1], tiny_arch("llama"))
    assert leftovers(tmp_path) == []


FULL_DISK = [OSError(errno.ENOSPC, "No space left on device"),
             SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                             'message: "No space left on device" })')]


@pytest.mark.parametrize("error", FULL_DISK, ids=["oserror", "safetensors"])
def test_a_full_disk_leaves_the_previous_export_and_no_staging_directory(error, model_dirs, tmp_path, monkeypatch):
    import actors.stream_export

    out = export_compact(model_dirs["llama"], MASKS[0], tmp_path / "compact")
    before = snapshot(out)
    real = actors.stream_export._write_shard

    def full_disk(path, *args):
        real(path, *args)  # a shard is written, then the disk is full
        raise error

    monkeypatch.setattr(actors.stream_export, "_write_shard", full_disk)
    with pytest.raises(OSError) as info:
        export_compact(model_dirs["llama"], MASKS[1], tmp_path / "compact")
    message = str(info.value)
    assert f"export to {out} failed" in message and "No space left on device" in message
    assert f"the previous {out} is untouched" in message and "free disk space" in message
    assert snapshot(out) == before and leftovers(tmp_path) == []

    with pytest.raises(OSError, match="nothing was written to"):
        export_compact(model_dirs["llama"], MASKS[1], tmp_path / "new")
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
