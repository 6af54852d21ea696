"""A driver killed at any write of a campaign loses nothing and serves nothing stale.

Each kill point of tests/killpoints.py ends a real ``rayprune run`` driver (a subprocess with its
own Ray session) with ``os._exit`` at that write; the same command then runs again. The rerun must
finish, reach the fault-free path, hold one ok row per key, and leave no artefact (model/,
pruning_config.json) that disagrees with path.json. The output is a ``file://`` URI, so the mirror
is on the route of every write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cache import read_part
from orchestrator.campaign import Campaign
from orchestrator.config_load import load_config
from orchestrator.rundir import RunDir
from tests.killpoints import POINTS
from tests.orchestrator.test_faults import _reap_session
from tests.tiny import tiny_overrides, tiny_run_setup

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"search.target_ratio": 0.5, "search.max_steps": 2, "cluster.actors": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("kill"))


@pytest.fixture(scope="module")
def reference(ray_session, setup):
    result = Campaign(load_config(None, tiny_overrides(setup, "reference", **SETTINGS)), progress=False).run()
    return [(s.kind, s.layer, round(s.ppl, 6)) for s in result.searcher.path], result.heldout


def driver(setup, name: str, env: dict[str, str], point: str | None = None) -> subprocess.CompletedProcess:
    uri = f"file://{setup['root'] / 'bucket' / name}"
    config = setup["root"] / f"{name}.yaml"
    config.write_text(f"# rayprune run {config.name} (killed by test_kill_points.py)\nname: {name}\n")
    args = ["run", "--no-progress", str(config), *tiny_overrides(setup, name, **SETTINGS, output=uri)]
    cmd = [sys.executable, "-m", "tests.killpoints", point, *args] if point else \
        [sys.executable, "-m", "orchestrator.cli", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _reap_session(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.parametrize("point", POINTS)
def test_a_kill_at_any_write_loses_nothing(point, setup, reference, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYPRUNE_CACHE"] = str(tmp_path / "cache")  # this driver's staging directory
    name = f"kill-{point.replace('.', '-')}"
    killed = driver(setup, name, env, point)
    assert killed.returncode == 137, killed.stdout[-3000:]
    again = driver(setup, name, env)
    assert again.returncode == 0, again.stdout[-3000:]

    run = RunDir(setup["root"] / "bucket" / name)  # what reached the storage
    path = run.read_path()
    assert [(s["kind"], s["layer"], round(s["ppl"], 6)) for s in path["steps"]] == reference[0]
    assert path["heldout"] == pytest.approx(reference[1])
    assert run.stale_artefacts(path) == []
    assert (run.path / "model" / "config.json").is_file()
    rows = [r for part in sorted(run.evals.glob("part-*.parquet")) for r in read_part(part)]
    ok = [r["key"] for r in rows if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) > 0  # compaction left one row per key, none lost
