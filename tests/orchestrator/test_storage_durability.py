"""The mirror never deletes what the run did not delete itself (issue: Nothing lost, defects 1, 10)."""

from __future__ import annotations

import logging
import shutil

import pytest

from orchestrator.files import remove
from orchestrator.storage import RunStorage, canonical_uri, staging_dir


@pytest.fixture
def finished_uri(tmp_path, monkeypatch):
    """A URI holding a finished run (cache parts, path.json, model files), and its staging copy."""
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "run"
    (remote / "evals").mkdir(parents=True)
    (remote / "model").mkdir()
    for name in ("evals/part-1.parquet", "evals/part-2.parquet", "path.json", "model/model.safetensors"):
        (remote / name).write_bytes(name.encode())
    return remote


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_vanished_staging_directory_deletes_nothing(finished_uri, caplog):
    before = files(finished_uri)
    storage = RunStorage(f"file://{finished_uri}", interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="rayprune"):
        with storage:  # pulls the run, then the staging directory is cleaned away mid-run
            shutil.rmtree(storage.local)
    assert files(finished_uri) == before
    assert "staging directory" in caplog.text and "is gone" in caplog.text


def test_an_emptied_staging_directory_deletes_nothing(finished_uri):
    before = files(finished_uri)
    storage = RunStorage(f"file://{finished_uri}", interval_s=3600)
    with storage:
        shutil.rmtree(storage.local)
        storage.local.mkdir()  # recreated empty (a new disk, a cleaned cache)
    assert files(finished_uri) == before


def test_only_files_removed_on_purpose_are_deleted_remotely(finished_uri):
    storage = RunStorage(f"file://{finished_uri}", interval_s=3600)
    with storage:
        (storage.local / "model" / "model.safetensors").unlink()  # lost locally: kept remotely
        remove(storage.local / "evals" / "part-1.parquet")  # merged by compaction: deleted remotely
    assert files(finished_uri) == ["evals/part-2.parquet", "model/model.safetensors", "path.json"]
    assert not (storage.local / "evals" / ".removed").exists()  # the journal is done with


def test_one_location_has_one_staging_directory():
    assert canonical_uri("s3://bucket/runs/x/") == canonical_uri("S3://bucket/runs/x") == "s3://bucket/runs/x"
    assert staging_dir("s3://bucket/runs/x/") == staging_dir("s3://bucket/runs/x")
    assert canonical_uri("runs/x/") == "runs/x/"  # a path is left as it is
