"""`ray job submit` against a real local Ray head runs a campaign unchanged (CLI and Python client)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.head import LocalHead
from tests.tiny import save_tiny, write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    head = LocalHead(num_cpus=2).start()
    yield head
    head.stop()
    assert head.pids() == []


@pytest.fixture(scope="module")
def campaign_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    model, corpus = save_tiny("llama", root / "model"), write_corpus(root / "corpus.txt")

    def make(name: str) -> Path:
        config = root / f"{name}.yaml"
        config.write_text(
            f"name: {name}\nmodel: {model}\n"
            f"data: {{corpus: {corpus}, calibration: {{sequences: 4, length: 24}}, evaluation: {{sequences: 2, length: 24}}}}\n"
            f"search: {{method: blockpruner, target_ratio: 0.2, max_steps: 2, batch_size: 2}}\n"
            f"cluster: {{actors: 1, cpus_per_actor: 1}}\noutput: {root / 'runs' / name}\n")
        return config

    return make


def assert_complete(run_dir: Path) -> None:
    import json

    for name in ("config.yaml", "calibration.parquet", "path.json", "report.md", "pruning_config.json",
                 "model/config.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "evals").glob("part-*.parquet"))
    path = json.loads((run_dir / "path.json").read_text())
    assert len(path["steps"]) == 2 and path["heldout"]["pruned_ppl"] > 0


def entrypoint(config: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", str(config), "--no-progress"]


def test_ray_job_submit_cli(head, campaign_config):
    config = campaign_config("cli")
    ray = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO),
                           "--", *entrypoint(config)], env=head.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout.lower()
    assert "step 1: remove" in done.stdout  # one log line per step reaches the job's logs
    assert_complete(config.parent / "runs" / "cli")


def test_job_submission_client(head, campaign_config):
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = campaign_config("client")
    refused = JobSubmissionClient.__new__(JobSubmissionClient)  # (the constructor itself calls the head)
    with pytest.raises(Exception, match="(?i)unauthori[sz]ed|authentication|401"):
        refused.__init__(head.dashboard_url, headers={"Authorization": "Bearer " + "0" * 64})
    client = JobSubmissionClient(head.dashboard_url, headers=head.headers)
    job = client.submit_job(entrypoint=" ".join(entrypoint(config)), runtime_env={"working_dir": str(REPO)})
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in time"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "masks from" in logs  # one line per result when no progress bar is shown
    assert_complete(config.parent / "runs" / "client")


def test_joining_a_cluster_without_its_token_says_where_the_token_goes(head, campaign_config, tmp_path):
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_ADDRESS=head.gcs_address, HOME=str(tmp_path))  # no ~/.ray/auth_token either
    done = subprocess.run(entrypoint(campaign_config("no-token")), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "requires token authentication and this process has no token" in done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr and "ray get-auth-token" in done.stderr


def test_a_wrong_token_is_named_in_the_error(head, monkeypatch):
    from cluster.auth import ClusterAuthError, check_cluster_access, probe_gcs

    assert probe_gcs(head.gcs_address, head.token) == "ok"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "f" * 64)
    with pytest.raises(ClusterAuthError, match="the token from RAY_AUTH_TOKEN was refused"):
        check_cluster_access(head.gcs_address)
