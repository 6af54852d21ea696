"""Real faults injected into tiny-model campaigns (issue 7.1).

Each test breaks one thing for real: an evaluator process SIGKILLed by its PID, an evaluator that
hangs, a mask whose evaluation raises (once, or always), a driver process SIGKILLed mid-campaign,
a truncated cache part. Every faulty run must end on the fault-free run's removal path, and its
cache must hold exactly one "ok" row per mask the search needed: none lost, none counted twice.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cache import CorruptPartWarning, read_part
from orchestrator.campaign import Campaign, CampaignResult
from orchestrator.config_load import load_config
from search_spaces import Mask, mask_key
from tests import faults
from tests.tiny import tiny_overrides, tiny_run_setup

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 2
SETTINGS = {"search.target_ratio": 0.5, "search.max_steps": MAX_STEPS, "cluster.max_attempts": 3, "export": "false"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("faults"))


def overrides(setup, name: str, **extra) -> list[str]:
    return tiny_overrides(setup, name, **{**SETTINGS, **extra})


def run_campaign(setup, name: str, evaluator_cls: type | None = None, **extra) -> tuple[Campaign, CampaignResult]:
    campaign = Campaign(load_config(None, overrides(setup, name, **extra)), progress=False,
                        evaluator_cls=evaluator_cls)
    return campaign, campaign.run()


def cache_rows(run_dir: Path) -> list[dict]:
    """Every row of every readable part (duplicates kept: that is what is checked)."""
    return [row for part in sorted((run_dir / "evals").glob("part-*.parquet")) for row in read_part(part)]


@pytest.fixture(scope="module")
def reference(ray_session, setup):
    """The fault-free run every faulty run is compared with."""
    campaign, result = run_campaign(setup, "reference")
    rows = cache_rows(result.run_dir)
    assert result.counters.failed == 0 and result.counters.cached == 0
    assert all(r["status"] == "ok" for r in rows) and len({r["key"] for r in rows}) == len(rows)
    return {"campaign": campaign, "result": result, "ok_keys": {r["key"] for r in rows}, "rows": rows}


def path_of(result: CampaignResult) -> list[tuple[str, int]]:
    return [(s.kind, s.layer) for s in result.searcher.path]


def check_against_reference(campaign: Campaign, result: CampaignResult, reference, *, lost: set[str] = frozenset()):
    """Same path and figures as the fault-free run; one ok row per needed mask, none twice.

    ``lost``: keys that a permanent fault keeps from ever being scored (failed rows instead).
    """
    ref: CampaignResult = reference["result"]
    assert path_of(result) == path_of(ref)
    assert [s.ppl for s in result.searcher.path] == pytest.approx([s.ppl for s in ref.searcher.path], rel=1e-6)
    assert result.searcher.dense_ppl == pytest.approx(ref.searcher.dense_ppl, rel=1e-6)
    assert result.heldout == pytest.approx(ref.heldout, rel=1e-6)
    assert len(result.searcher.path) == MAX_STEPS

    rows = cache_rows(result.run_dir)
    ok = collections.Counter(r["key"] for r in rows if r["status"] == "ok")
    assert [k for k, n in ok.items() if n > 1] == [], "a mask was recorded twice"
    assert set(ok) == reference["ok_keys"] - lost, "an evaluation was lost (or an extra one made)"
    by_key = {r["key"]: r for r in rows if r["status"] == "ok"}
    calibration = [(Mask(), result.searcher.dense_ppl)] + [(s.mask, s.ppl) for s in result.searcher.path]
    for mask, ppl in calibration:
        key = mask_key(mask, campaign.scorer.model_fingerprint, campaign.scorer.fingerprints["calibration"])
        assert ok[key] == 1 and by_key[key]["ppl"] == pytest.approx(ppl, rel=1e-6)
    for mask in (Mask(), result.searcher.current):
        assert ok[mask_key(mask, campaign.scorer.model_fingerprint, campaign.scorer.fingerprints["evaluation"])] == 1
    return rows


def workers_of(rows: list[dict]) -> set[int]:
    return {int(r["worker"].rsplit(":", 1)[1]) for r in rows if r["status"] == "ok"}


# ---- an evaluator process dies --------------------------------------------------------------------
def test_sigkilled_evaluator_is_restarted_and_its_masks_rerouted(reference, setup, tmp_path):
    cls = faults.configure(faults.KilledOnce, tmp_path)
    campaign, result = run_campaign(setup, "killed-evaluator", cls)

    [pid] = faults.events(tmp_path, "killed")
    rows = check_against_reference(campaign, result, reference)
    assert int(pid) not in workers_of(rows)  # nothing came back from the dead process
    assert campaign.scorer.dispatcher.resubmissions == 1  # the dead task only: no other task paid for the restart
    assert result.counters.failed == 0
    assert result.counters.evaluated == reference["result"].counters.evaluated


# ---- an evaluator hangs -----------------------------------------------------------------------------
def test_hung_evaluator_times_out_is_restarted_and_rerouted(reference, setup, tmp_path, caplog):
    cls = faults.configure(faults.HungOnce, tmp_path)
    with caplog.at_level(logging.WARNING, logger="orchestrator.dispatch"):
        campaign, result = run_campaign(setup, "hung-evaluator", cls, **{"cluster.eval_timeout_s": 2})

    [event] = faults.events(tmp_path, "hung")
    pid, n_masks = map(int, event.split())
    assert f"exceeded {2 * n_masks} s" in caplog.text
    assert caplog.text.count("exceeded") == 1, caplog.text  # the restart itself is not timed out
    assert campaign.scorer.dispatcher.resubmissions == 1
    rows = check_against_reference(campaign, result, reference)
    assert pid not in workers_of(rows)
    assert result.counters.failed == 0
    assert result.counters.evaluated == reference["result"].counters.evaluated


# ---- a mask's evaluation raises ---------------------------------------------------------------------
def test_transient_raise_is_retried_and_the_path_unchanged(reference, setup, tmp_path):
    chosen = reference["result"].searcher.path[0].mask  # the mask step 1 must find
    cls = faults.configure(faults.RaisesOnMask, tmp_path, mask_json=chosen.to_json())
    campaign, result = run_campaign(setup, "transient-raise", cls)

    attempts = faults.events(tmp_path, "attempts")
    assert len(attempts) == 2 and int(attempts[1].split()[1]) == 1  # raised, then scored on its own
    check_against_reference(campaign, result, reference)
    assert result.counters.failed == 0
    assert result.counters.evaluated == reference["result"].counters.evaluated


def test_mask_that_always_raises_is_recorded_failed_and_the_search_goes_on(reference, setup, tmp_path):
    ref_campaign, ref = reference["campaign"], reference["result"]
    # A step-1 candidate that did not win (the fault may not change the path, only lose that mask).
    winner = ref.searcher.path[0].mask
    losers = [Mask.from_json(r["mask_json"]) for r in reference["rows"]
              if r["calibration_fp"] == ref_campaign.scorer.fingerprints["calibration"]]
    victim = next(m for m in losers if len(m.attn_removed) + len(m.mlp_removed) == 1 and m != winner)
    victim_key = mask_key(victim, ref_campaign.scorer.model_fingerprint, ref_campaign.scorer.fingerprints["calibration"])
    cls = faults.configure(faults.RaisesOnMask, tmp_path, mask_json=victim.to_json(), always=True)
    campaign, result = run_campaign(setup, "always-raises", cls)

    assert len(faults.events(tmp_path, "attempts")) == 3  # cluster.max_attempts
    assert result.counters.failed == 1
    assert result.counters.evaluated == ref.counters.evaluated - 1
    rows = check_against_reference(campaign, result, reference, lost={victim_key})
    [failed] = [r for r in rows if r["status"] == "failed"]
    assert failed["key"] == victim_key and math.isnan(failed["ppl"])
    assert "injected fault" in failed["error"]
    assert campaign.scorer.cache.get(victim_key) is None and campaign.scorer.cache.get_failed(victim_key) is not None


# ---- the driver is killed ---------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's process group (its private Ray session with it); reap the driver."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray's workers have process groups of their own)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def _reap_session(sid: int, wait_s: float = 30.0) -> list[int]:
    """Wait for the killed driver's session to die out; SIGKILL (by PID) and return what did not."""
    deadline = time.monotonic() + wait_s
    while (left := _session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def test_killed_driver_resumes_from_the_cache(reference, setup, tmp_path):
    name = "killed-driver"
    run_dir = setup["root"] / name
    config_file = tmp_path / "config.yaml"
    config_file.write_text("# rayprune run config.yaml (driver killed by test_faults.py)\nname: killed-driver\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log_file = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--no-progress", str(config_file),
                             *overrides(setup, name)], cwd=REPO, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "evals").glob("part-*.parquet")):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, "the driver wrote no cache part within 120 s"
            time.sleep(0.005)
        assert proc.poll() is None, "the driver finished before it could be killed"
    finally:
        _kill_group(proc)
        log_file.close()
        left = _reap_session(proc.pid)
    assert not left, f"processes of the killed driver's Ray session outlived it by 30 s: {left}"
    assert not (run_dir / "path.json").exists()

    before = cache_rows(run_dir)
    assert all(r["status"] == "ok" for r in before)
    cached_keys = {r["key"] for r in before}
    total = reference["result"].counters.evaluated
    assert 0 < len(cached_keys) < total

    campaign, result = run_campaign(setup, name)  # the rerun, in this process
    check_against_reference(campaign, result, reference)
    assert result.counters.cached == len(cached_keys)
    assert result.counters.evaluated == total - len(cached_keys)  # only what was never written
    assert result.counters.failed == 0


# ---- a cache part is truncated ----------------------------------------------------------------------
def test_truncated_part_is_quarantined_and_only_its_rows_recomputed(reference, setup):
    run_dir = setup["root"] / "truncated-part"
    shutil.copytree(reference["result"].run_dir / "evals", run_dir / "evals")
    parts = sorted((run_dir / "evals").glob("part-*.parquet"))
    victim = parts[len(parts) // 2]
    lost = len(read_part(victim))
    with open(victim, "r+b") as handle:
        handle.truncate(victim.stat().st_size // 2)

    with pytest.warns(CorruptPartWarning, match=victim.name):
        campaign, result = run_campaign(setup, "truncated-part")

    assert not victim.exists() and (run_dir / "evals" / "quarantine" / victim.name).exists()
    check_against_reference(campaign, result, reference)
    assert result.counters.evaluated == lost
    assert result.counters.cached == reference["result"].counters.evaluated - lost
    assert result.counters.failed == 0
