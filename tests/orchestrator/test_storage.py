"""Run directories behind a URI: pulled to resume, mirrored while running and at the end.

``file://`` URIs go through the same pyarrow.fs calls as ``s3://`` or ``gs://`` ones.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.campaign import Campaign
from orchestrator.config import ConfigError
from orchestrator.config_load import load_config
from orchestrator.files import remove
from orchestrator.storage import RunStorage, staging_dir, uri_problem, uri_scheme
from tests.tiny import tiny_campaign_config, tiny_run_setup


def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def staging(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))


def test_schemes():
    assert uri_scheme("s3://bucket/runs/a") == "s3" and uri_scheme("runs/a") is None
    assert uri_scheme("/abs/path") is None and uri_problem("gs://b/x") is None
    assert "scheme ftp://" in uri_problem("ftp://host/x") and "s3://" in uri_problem("ftp://host/x")


def test_a_path_is_used_as_it_is(tmp_path):
    storage = RunStorage(str(tmp_path / "run"))
    assert not storage.remote and storage.local == tmp_path / "run"
    with storage:
        (tmp_path / "run").mkdir()
    assert storage.push() == 0 and storage.pull() == 0


def test_mirror_uploads_changes_skips_dotfiles_and_deletes_what_is_gone(tmp_path, staging, monkeypatch):
    remote = tmp_path / "bucket" / "run"
    storage = RunStorage(f"file://{remote}", interval_s=3600)
    assert storage.local == staging_dir(f"file://{remote}") and storage.local.is_relative_to(tmp_path / "cache")
    with storage:  # nothing to pull yet
        (storage.local / "evals").mkdir(parents=True)
        (storage.local / "evals" / "part-1.parquet").write_bytes(b"a" * 10)
        (storage.local / "path.json").write_text("{}")
        (storage.local / ".lock").write_text("123")
        (storage.local / "evals" / ".part-2.parquet.tmp").write_bytes(b"partial")
    assert tree(remote) == {"evals/part-1.parquet": b"a" * 10, "path.json": b"{}"}

    assert storage.push() == 0  # nothing changed
    (storage.local / "path.json").write_text('{"steps": []}')
    remove(storage.local / "evals" / "part-1.parquet")  # compaction merged it (journaled) ...
    (storage.local / "evals" / "part-9.parquet").write_bytes(b"b" * 20)  # ... into this one
    assert storage.push() == 2
    assert tree(remote) == {"evals/part-9.parquet": b"b" * 20, "path.json": b'{"steps": []}'}

    # Another machine (another staging directory) resumes from what reached the storage.
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "other-machine"))
    other = RunStorage(f"file://{remote}/")
    assert other.local != storage.local and other.pull() == 2
    assert tree(other.local) == tree(remote)
    assert other.push() == 0  # what was pulled is not uploaded again


def test_bad_uris_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="scheme ftp://"):
        load_config(None, ["name=x", "model=smollm2-135m", "search.target_ratio=0.2", "output=ftp://host/x"])
    config = load_config(None, ["name=x", "model=smollm2-135m", "search.target_ratio=0.2", "output=s3://b/x"])
    assert config.output == "s3://b/x"


@pytest.mark.ray
def test_campaign_on_a_uri_mirrors_its_run_directory_and_resumes_from_it(ray_session, tmp_path, staging):
    setup = tiny_run_setup(tmp_path / "setup")
    remote = tmp_path / "bucket" / "tiny"
    config = tiny_campaign_config(setup, "tiny", **{"search.target_ratio": 0.5, "search.max_steps": 2,
                                                     "output": f"file://{remote}"})
    first = Campaign(config, progress=False)
    result = first.run()
    assert result.counters.evaluated > 0 and result.run_dir == first.storage.local != remote
    stored = tree(remote)
    assert {"path.json", "config.yaml", "calibration.parquet", "report.md", "model/config.json"} <= set(stored)
    assert any(name.startswith("evals/") for name in stored) and not any("/." in f"/{n}" for n in stored)
    assert stored == {k: v for k, v in tree(first.storage.local).items() if not k.startswith(".")}
    path = json.loads(stored["path.json"])

    # A new driver elsewhere (its staging directory gone) resumes from the storage: nothing is evaluated.
    import shutil

    shutil.rmtree(first.storage.local)
    again = Campaign(config, progress=False).run()
    assert again.counters.evaluated == 0 and again.counters.cached == result.counters.evaluated
    assert [(s.kind, s.layer) for s in again.searcher.path] == [(s["kind"], s["layer"]) for s in path["steps"]]


def test_a_failed_final_mirror_keeps_the_campaigns_own_error(tmp_path, staging, monkeypatch, caplog):
    storage = RunStorage(f"file://{tmp_path / 'bucket' / 'run'}", interval_s=3600)

    def unreachable():
        raise OSError("storage unreachable")

    monkeypatch.setattr(storage, "push", unreachable)
    with pytest.raises(RuntimeError, match="the search failed"), storage:
        raise RuntimeError("the search failed")
    assert "every result is kept in" in caplog.text and str(storage.local) in caplog.text
    with pytest.raises(OSError, match="storage unreachable"), storage:
        pass
