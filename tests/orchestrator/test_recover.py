"""``rayprune recover`` and a campaign's ``recovery:`` section, end to end on a tiny model with Ray Train.

A tiny campaign (2 BlockPruner steps) runs with a recovery section; the other tests recover copies of
its run directory: 2 DDP workers against 1, a driver killed mid-run and rerun, and bad input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from orchestrator.campaign import Campaign
from orchestrator.config_load import load_config
from orchestrator.recover import RecoveryError, read_log, recover
from orchestrator.recovery_config import load_recovery
from tests.orchestrator.test_faults import _reap_session
from tests.tiny import tiny_overrides, tiny_run_setup

pytestmark = [pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]
# Fast settings for the tiny model: text windows of the run's own corpus, no warm-up, a high lr.
RECOVERY = {"data": "run", "max_length": 32, "val_rows": 8, "r": 4, "alpha": 8, "dropout": 0.0, "lr": 0.01,
            "batch_size": 4, "grad_accum": 2, "max_steps": 12, "warmup_steps": 0, "log_every": 1,
            "checkpoint_every": 4}


def settings(**changes) -> list[str]:
    return [f"{k}={v}" for k, v in {**RECOVERY, **changes}.items()]


@pytest.fixture(scope="module")
def campaign(ray_session, tmp_path_factory):
    """A finished tiny campaign whose config carries a recovery: section (it ran after the export)."""
    setup = tiny_run_setup(tmp_path_factory.mktemp("recover"))
    overrides = tiny_overrides(setup, "with-recovery", **{"search.target_ratio": 0.3, "search.max_steps": 2,
                                                          "cluster.actors": 1})
    config = load_config(None, [*overrides, *(f"recovery.{o}" for o in settings())])
    Campaign(config, progress=False).run()
    return Path(config.output)


def copy_run(campaign: Path, tmp_path: Path, name: str) -> Path:
    """The campaign's run directory without its recovery, to recover again."""
    target = tmp_path / name
    shutil.copytree(campaign, target, ignore=shutil.ignore_patterns("recovery"))
    return target


def adapter(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "recovery" / "adapter" / "adapter_model.safetensors"))


def test_a_campaign_recovers_its_export_and_reports_it(campaign):
    from actors.export import load_pruned

    result = json.loads((campaign / "recovery" / "result.json").read_text())
    assert result["train"]["steps"] == 12 and result["train"]["tokens_trained"] == 12 * 8 * 32
    held = result["heldout"]
    assert held["recovered"] < held["pruned"]  # the fine-tuning helped on text it never saw
    path = json.loads((campaign / "path.json").read_text())
    assert held["dense"] == pytest.approx(path["heldout"]["dense_ppl"])
    assert held["pruned"] == pytest.approx(path["heldout"]["pruned_ppl"], rel=1e-4)  # the run's own windows
    model = load_pruned(campaign / "recovery" / "model")
    assert type(model).__module__.startswith("transformers.")
    log = read_log(campaign / "recovery" / "log.jsonl")
    assert [e["step"] for e in log] == list(range(1, 13))
    assert log[-1]["loss"] < log[0]["loss"]
    report = (campaign / "report.md").read_text()
    assert "Recovery" in report and (campaign / "recovery" / "loss.png").is_file()


def test_two_ddp_workers_follow_the_one_worker_curve(campaign, tmp_path):
    run = copy_run(campaign, tmp_path, "two-workers")
    recover(run, load_recovery(None, settings(workers=2)), progress=False)
    one = read_log(campaign / "recovery" / "log.jsonl")
    two = read_log(run / "recovery" / "log.jsonl")
    assert [e["step"] for e in two] == [e["step"] for e in one]
    assert [e["tokens"] for e in two] == [e["tokens"] for e in one]  # the same sequences each step
    # the same global batch and loss normalisation: the same curve up to summation order
    np.testing.assert_allclose([e["loss"] for e in two], [e["loss"] for e in one], rtol=1e-4)
    ref, got = adapter(campaign), adapter(run)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5)


LONG = dict(max_steps=200, checkpoint_every=10, log_every=5, evaluate="false")


def _command(run: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "recover", "--no-progress", str(run), *settings(**LONG)]


def registered_step(run: Path) -> int | None:
    """The step of the latest checkpoint Ray Train's controller registered in the run's storage (the one
    a rerun restores; a checkpoint written but not yet registered is not), or None."""
    snapshot = run / "recovery" / "ray" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return int(latest["metrics"]["step"]) if latest else None


def test_a_killed_recovery_resumes_from_its_last_checkpoint(campaign, tmp_path):
    """A driver (its own Ray session) SIGKILLed once Ray Train registered a checkpoint; the same
    command again. The controller registers what the workers report when it polls them (every 2 s by
    default; 0.1 s here, so that the kill lands mid-training)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    whole = copy_run(campaign, tmp_path, "whole")
    recover(whole, load_recovery(None, settings(**LONG)), progress=False)  # the uninterrupted run
    killed = copy_run(campaign, tmp_path, "killed")
    log_file = killed / "recovery" / "log.jsonl"
    proc = subprocess.Popen(_command(killed), cwd=REPO, env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (registered_step(killed) or 0) >= 10:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _reap_session(proc.pid)
    assert proc.returncode == -signal.SIGKILL, "the recovery finished before it could be killed"
    assert not (killed / "recovery" / "result.json").exists()
    done = subprocess.run(_command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    started = [ln for ln in done.stderr.splitlines() if "recovery: step" in ln and "of 200" in ln]
    resumed_at = int(started[0].split("recovery: step ")[1].split()[0])
    assert 10 <= resumed_at < 200  # from its last checkpoint (every 10 steps), not from step 0
    steps = [e["step"] for e in read_log(log_file)]
    assert steps == list(range(5, 201, 5))  # the log lines past the checkpoint were dropped, then rewritten
    assert json.loads((killed / "recovery" / "result.json").read_text())["train"]["steps"] == 200
    ref, got = adapter(whole), adapter(killed)
    for name in ref:  # one CPU worker with one thread: the same arithmetic in the same order
        np.testing.assert_allclose(got[name], ref[name], atol=1e-6)


def test_bad_input_is_refused_before_training(campaign, tmp_path):
    run = copy_run(campaign, tmp_path, "bad")
    shutil.rmtree(run / "model")
    with pytest.raises(RecoveryError, match="not a compact model.*rayprune export"):
        recover(run, load_recovery(None, settings()), progress=False)
    run = copy_run(campaign, tmp_path, "bad-target")
    with pytest.raises(ValueError, match="w_proj"):
        recover(run, load_recovery(None, settings(targets="q_proj,w_proj")), progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        recover(run, load_recovery(None, settings(data=str(broken))), progress=False)
    assert not (run / "recovery" / "ray").exists()  # nothing started


def test_a_rerun_with_other_settings_must_say_fresh(campaign, tmp_path):
    run = copy_run(campaign, tmp_path, "changed")
    shutil.copytree(campaign / "recovery", run / "recovery")
    with pytest.raises(RecoveryError, match=r"lr 0.01 -> 0.02.*--fresh"):
        recover(run, load_recovery(None, settings(lr=0.02)), progress=False)
    assert recover(run, load_recovery(None, settings()), progress=False) == \
        json.loads((campaign / "recovery" / "result.json").read_text())  # finished: reused, not trained again
    config_file = run / "model" / "config.json"
    config = json.loads(config_file.read_text())
    config["rayprune"]["params"] += 1  # as if another model had been exported there since
    config_file.write_text(json.dumps(config))
    with pytest.raises(RecoveryError, match="the compact model"):
        recover(run, load_recovery(None, settings()), progress=False)
