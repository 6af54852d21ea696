"""``cluster/gpu_check.py``: the real ``rayprune run`` path on a tiny model, here on CPUs (``--allow-cpu``);
without a GPU and without that flag it refuses before running anything.

Each test runs the script as ``make gpu-check`` does, in a subprocess with a private Ray session of
its own (about 20 s here).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
CHECKS = ["the campaign finished", "the removal path is not empty", "the path narrows widths",
          "every perplexity is finite", "no evaluation failed", "the replica computed on the CPU",
          "the dtype is the resolved one (auto -> float32)", "the export's held-out perplexity is the run's"]


def gpu_check(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private session, never a shared one
    env["RAYPRUNE_CACHE"] = str(cwd / "cache")
    return subprocess.run([sys.executable, str(REPO / "cluster" / "gpu_check.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_allow_cpu_runs_a_real_campaign_and_passes_every_check(tmp_path):
    done = gpu_check("--allow-cpu", "--output", str(tmp_path / "run"), cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert "cluster resources:" in out and '"cuda": false' in out  # what it sees, as before
    for name in CHECKS:
        assert f"PASS: {name}" in out, name
    assert "FAIL" not in out and "gpu check: all checks passed" in out
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_without_a_gpu_it_refuses_unless_allowed(tmp_path):
    done = gpu_check(cwd=tmp_path)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAIL: no GPU visible to Ray" in done.stdout and "--allow-cpu" in done.stdout
    assert "PASS" not in done.stdout and not list(tmp_path.glob("**/path.json"))
