"""The model fingerprint covers every weight byte; its per-file digest cache never lies.

The model is a real (random) Llama saved by transformers, sized so that its middle layers lie more
than 1 MiB from both ends of the safetensors file: the old fingerprint hashed only the first and
last MiB, and ``tests.tiny.save_tiny``'s whole file is smaller than that. Every test points
``RAYPRUNE_CACHE`` at its own directory, so the user's digest cache is never touched.

A file is cached only once its mtime and ctime are ``SETTLE_SECONDS`` old. The tests shorten that
window from 2 s (coarse-timestamp filesystems) to 0.1 s, ample for the nanosecond timestamps here,
and wait it out with :func:`settle` where a digest must be cached.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from actors import fingerprint

MIB = 1 << 20
WEIGHTS = "model.safetensors"
MIDDLE = "model.layers.3.mlp.up_proj.weight"  # layer 3 of 6: 1 MiB of float32 in the middle


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A Llama of 6 layers (hidden 128, MLP 2048: about 20 MB in fp32) with a tokenizer, saved once."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import char_tokenizer, tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 128, 2048, 6
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    assert [p.name for p in directory.glob("*.safetensors")] == [WEIGHTS]
    return directory


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test's own rayprune cache root; returns the digest cache file's path."""
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    # raising=False: the defect's test also runs against the old module, which has no such window.
    monkeypatch.setattr(fingerprint, "SETTLE_SECONDS", 0.1, raising=False)
    return tmp_path / "cache" / "fingerprints.json"


def settle() -> None:
    """Wait until files changed just now are old enough to be cached."""
    time.sleep(1.5 * fingerprint.SETTLE_SECONDS)


def age(file: Path, seconds: float = 3600.0) -> None:
    """Set ``file``'s mtime ``seconds`` back (a model at rest), and let its ctime settle."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(file, ns=(then, then))
    settle()


def cached_files(cache: Path) -> set[str]:
    return set(json.loads(cache.read_text())["files"])


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every file the fingerprint reads in full, in order (the hashing helper, counted)."""
    calls: list[str] = []
    real = fingerprint._sha256_file

    def counted(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(fingerprint, "_sha256_file", counted)
    return calls


def copy_model(source: Path, target: Path, *, at_rest: bool = True) -> Path:
    """A copy of ``source``; ``at_rest``: last modified an hour ago and settled, else just written."""
    shutil.copytree(source, target)
    if at_rest:
        then = time.time_ns() - 3600 * 10**9
        for file in target.iterdir():
            os.utime(file, ns=(then, then))
        settle()
    return target


def edit_tensor_in_place(file: Path, name: str, delta: float = 1e-3) -> tuple[int, int]:
    """Add ``delta`` to every value of float32 tensor ``name``, rewriting only its bytes (header,
    size and every other byte unchanged). Returns the byte range of its data in the file."""
    with open(file, "r+b") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(header_len))[name]
        assert entry["dtype"] == "F32"
        begin, end = (8 + header_len + offset for offset in entry["data_offsets"])
        handle.seek(begin)
        values = np.frombuffer(handle.read(end - begin), dtype="<f4") + np.float32(delta)
        handle.seek(begin)
        handle.write(values.astype("<f4").tobytes())
    return begin, end


def test_a_copy_with_a_middle_tensor_changed_in_place_is_another_model(saved_model, tmp_path):
    """The defect: same config, same file size, same first and last MiB, one middle tensor changed."""
    from safetensors.torch import load_file

    original = copy_model(saved_model, tmp_path / "original")
    edited = copy_model(saved_model, tmp_path / "edited")
    before = fingerprint.model_fingerprint(original)
    size = (edited / WEIGHTS).stat().st_size
    begin, end = edit_tensor_in_place(edited / WEIGHTS, MIDDLE)

    assert MIB < begin and end < size - MIB  # out of reach of the old first/last-MiB hashes
    assert (edited / WEIGHTS).stat().st_size == size
    assert (edited / "config.json").read_bytes() == (original / "config.json").read_bytes()
    a, b = load_file(original / WEIGHTS), load_file(edited / WEIGHTS)
    assert [n for n in a if not a[n].equal(b[n])] == [MIDDLE]  # a valid model, one tensor changed
    assert fingerprint.model_fingerprint(edited) != before
    assert fingerprint.model_fingerprint(original) == before


def test_unchanged_files_are_not_read_again(saved_model, tmp_path, cache, hashes):
    model = copy_model(saved_model, tmp_path / "m")
    weights = model / WEIGHTS
    first = fingerprint.model_fingerprint(model)
    assert hashes == [str(weights.resolve())]
    entry = json.loads(cache.read_text())["files"][str(weights.resolve())]
    assert entry["size"] == weights.stat().st_size and entry["mtime_ns"] == weights.stat().st_mtime_ns

    assert fingerprint.model_fingerprint(model) == first  # from the cache
    assert fingerprint.model_fingerprint(model) == first
    assert len(hashes) == 1


def test_a_touched_or_rewritten_file_is_hashed_again(saved_model, tmp_path, hashes):
    model = copy_model(saved_model, tmp_path / "m")
    weights = model / WEIGHTS
    first = fingerprint.model_fingerprint(model)
    assert len(hashes) == 1

    mtime = weights.stat().st_mtime_ns
    os.utime(weights, ns=(mtime + 10**9, mtime + 10**9))  # touched: same bytes, new mtime
    settle()
    assert fingerprint.model_fingerprint(model) == first
    assert len(hashes) == 2
    assert fingerprint.model_fingerprint(model) == first  # the new stat is cached in turn
    assert len(hashes) == 2

    weights.write_bytes(weights.read_bytes())  # rewritten with the same bytes: same model
    os.utime(weights, ns=(mtime, mtime))
    settle()
    assert fingerprint.model_fingerprint(model) == first
    assert len(hashes) == 3
    assert fingerprint.model_fingerprint(model) == first
    assert len(hashes) == 3

    # Changed in place, then its mtime set back: size, mtime and inode as cached, only ctime moved.
    stat = weights.stat()
    edit_tensor_in_place(weights, MIDDLE)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    settle()
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == (
        stat.st_size, stat.st_mtime_ns, stat.st_ino)
    assert fingerprint.model_fingerprint(model) != first
    assert len(hashes) == 4


def test_a_freshly_written_file_is_not_cached(saved_model, tmp_path, cache, hashes, monkeypatch):
    """A write later in the same timestamp tick would leave the stat unchanged: do not cache yet."""
    monkeypatch.setattr(fingerprint, "SETTLE_SECONDS", 2.0)  # the real window
    model = copy_model(saved_model, tmp_path / "m", at_rest=False)
    first = fingerprint.model_fingerprint(model)
    assert fingerprint.model_fingerprint(model) == first
    assert len(hashes) == 2
    assert not cache.exists()


def test_a_file_that_keeps_changing_while_hashed_is_refused(saved_model, tmp_path, monkeypatch):
    model = copy_model(saved_model, tmp_path / "m")

    def growing(path: str) -> str:
        with open(path, "ab") as handle:
            handle.write(b"\0")
        return "0" * 64

    monkeypatch.setattr(fingerprint, "_sha256_file", growing)
    with pytest.raises(RuntimeError, match="changed while it was being hashed"):
        fingerprint.model_fingerprint(model)


@pytest.mark.parametrize("damage", ["not json", "empty", "truncated", "a list", "files a list",
                                    "old version", "entry of wrong shape", "stale entry"])
def test_a_corrupt_digest_cache_is_ignored(saved_model, tmp_path, cache, monkeypatch, damage, hashes):
    model = copy_model(saved_model, tmp_path / "m")
    real = str((model / WEIGHTS).resolve())
    expected = fingerprint.model_fingerprint(model)
    good = cache.read_text()
    entry = json.loads(good)["files"][real]
    wrong = {**entry, "mtime_ns": entry["mtime_ns"] + 1, "sha256": "0" * 64}  # another stat, a lie
    cache.write_text({
        "not json": "{not json",
        "empty": "",
        "truncated": good[: len(good) // 2],  # what a torn, non-atomic concurrent write leaves
        "a list": "[]",
        "files a list": json.dumps({"version": 2, "files": []}),
        "old version": json.dumps({"version": 1, "files": {real: {**entry, "sha256": "0" * 64}}}),
        "entry of wrong shape": json.dumps({"version": 2, "files": {real: {**entry, "size": "big"}}}),
        "stale entry": json.dumps({"version": 2, "files": {real: wrong}}),
    }[damage])

    assert fingerprint.model_fingerprint(model) == expected
    assert len(hashes) == 2  # recomputed, not taken from the damaged file
    assert json.loads(cache.read_text())["files"] == {real: entry}  # rewritten whole
    assert sorted(p.name for p in cache.parent.iterdir()) == ["fingerprints.json"]  # no temp files


def test_same_content_in_two_directories_has_one_fingerprint(saved_model, tmp_path, cache):
    a = copy_model(saved_model, tmp_path / "a")
    b = copy_model(saved_model, tmp_path / "b")
    a_weights, b_weights = str((a / WEIGHTS).resolve()), str((b / WEIGHTS).resolve())
    same = fingerprint.model_fingerprint(a)
    assert fingerprint.model_fingerprint(b) == same
    assert cached_files(cache) == {a_weights, b_weights}  # one digest per path

    shutil.rmtree(a)  # a's entry goes at the next write; b's own entry is replaced when b changes
    edit_tensor_in_place(b / WEIGHTS, MIDDLE)
    age(b / WEIGHTS)
    assert fingerprint.model_fingerprint(b) != same
    assert cached_files(cache) == {b_weights}
    c = copy_model(saved_model, tmp_path / "c")
    assert fingerprint.model_fingerprint(c) == same


def test_a_symlinked_weight_file_is_cached_under_its_target(saved_model, tmp_path, cache, hashes):
    """The hub's cache links snapshot files to blobs: one digest per blob, whichever link names it."""
    model = copy_model(saved_model, tmp_path / "m")
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    (model / WEIGHTS).rename(blob)
    (model / WEIGHTS).symlink_to(blob)
    settle()
    linked = fingerprint.model_fingerprint(model)
    assert linked == fingerprint.model_fingerprint(copy_model(saved_model, tmp_path / "plain"))
    assert str(blob.resolve()) in cached_files(cache)
    assert fingerprint.model_fingerprint(model) == linked
    assert hashes.count(str(blob.resolve())) == 1
