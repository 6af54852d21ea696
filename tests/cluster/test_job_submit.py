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
    client = JobSubmissionClient(head.dashboard_url)
    job = client.submit_job(entrypoint=" ".join(entrypoint(config)), runtime_env={"working_dir": str(REPO)})
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in time"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "masks from" in logs  # one line per result when no progress bar is shown
    assert_complete(config.parent / "runs" / "client")
