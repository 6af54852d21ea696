"""What a security review checks outside Ray itself: credentials, permissions, the study journal."""

from __future__ import annotations

import os
import stat

import pytest

from orchestrator.storage import RunStorage, redact_uri, uri_problem
from tests.tiny import tiny_arch


@pytest.mark.parametrize("uri", ["s3://AKIA:wJalrXUt@bucket/runs/x",
                                 "s3://bucket/runs/x?region=us-east-1&secret_key=wJalrXUt&access_key=AKIA",
                                 "abfs://container/runs/x?sas_token=wJalrXUt"])
def test_uris_with_credentials_are_refused_without_repeating_them(uri):
    problem = uri_problem(uri)
    assert problem is not None and "carries credentials" in problem and "environment" in problem
    assert "wJalrXUt" not in problem
    assert "wJalrXUt" not in redact_uri(uri) and "***" in redact_uri(uri)


def test_plain_uris_pass_and_logs_show_them_redacted():
    assert uri_problem("s3://bucket/runs/x?region=us-east-1&endpoint_override=minio:9000") is None
    assert redact_uri("s3://bucket/runs/x?region=us-east-1") == "s3://bucket/runs/x?region=us-east-1"
    assert redact_uri("runs/x") == "runs/x"
    assert "wJalrXUt" not in repr(RunStorage("s3://AKIA:wJalrXUt@bucket/x"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_cache_root_is_private(tmp_path, monkeypatch):
    from actors.models import cache_dir

    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    assert _mode(cache_dir()) == 0o700
    shared = tmp_path / "team-cache"
    shared.mkdir(mode=0o775)
    os.chmod(shared, 0o775)
    monkeypatch.setenv("RAYPRUNE_CACHE", str(shared))
    assert _mode(cache_dir()) == 0o775  # an existing cache keeps what its owner chose


def test_a_new_run_directory_is_private(tmp_path):
    from orchestrator.campaign import Campaign
    from orchestrator.config import Config, SearchConfig

    config = Config(name="x", model="m", search=SearchConfig(target_ratio=0.1), output=str(tmp_path / "runs" / "x"))
    campaign = Campaign(config, progress=False)
    campaign.lock()
    try:
        assert _mode(tmp_path / "runs" / "x") == 0o700
    finally:
        campaign.unlock()


def test_the_study_journal_is_private_and_never_unpickled(tmp_path):
    from orchestrator.search.optuna_search import OptunaSearcher

    journal = tmp_path / "optuna.journal"
    searcher = OptunaSearcher(tiny_arch("llama"), 0.3, trials=2, batch=2, warm_start="none", storage=journal)
    proposal = searcher.suggest()
    searcher.observe({mask: 10.0 for mask in proposal.masks})
    assert _mode(journal) == 0o600
    text = journal.read_text()
    assert text.strip() and all(line.startswith("{") for line in text.splitlines())  # JSON lines only
