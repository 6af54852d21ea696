"""An autoscaling cluster, faked: room for a second replica appears a few seconds after rayprune asks
the autoscaler for it. The campaign starts with the first replica and the second joins it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from actors.evaluator import Evaluator
from orchestrator.campaign import Campaign
from tests.tiny import tiny_campaign_config, tiny_run_setup

pytestmark = pytest.mark.ray


class Logged(Evaluator):
    """Logs (pid, start of every evaluate call) to ``log_dir``. Until a replica built after the room
    appeared has loaded (marker ``joined``), every call waits for it (at most 120 s), so the campaign
    cannot finish before the second replica could join."""

    log_dir: str = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if os.path.exists(os.path.join(self.log_dir, "released")):
            open(os.path.join(self.log_dir, "joined"), "w").close()

    def evaluate(self, *args, **kwargs):
        with open(os.path.join(self.log_dir, "calls.jsonl"), "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "start": time.time()}) + "\n")
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(self.log_dir, "joined")) and time.time() < deadline:
            time.sleep(0.1)
        return super().evaluate(*args, **kwargs)


def test_the_campaign_starts_with_the_first_replica_and_uses_the_ones_that_come_later(ray_session, tmp_path,
                                                                                       monkeypatch):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    import cluster.placement

    setup = tiny_run_setup(tmp_path / "setup")
    config = tiny_campaign_config(setup, "autoscaled", **{"cluster.actors": 2, "cluster.cpus_per_actor": 1,
                                                          "search.target_ratio": 0.2})
    deadline = time.time() + 30  # what earlier tests freed may take a moment to come back
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    free = ray.available_resources().get("CPU", 0)
    assert free == 2, f"the test session should be idle (2 free CPUs, found {free})"
    blocker = placement_group([{"CPU": 1}], strategy="STRICT_PACK")  # the node the autoscaler has not booted yet
    ray.get(blocker.ready())
    asked, released = [], {}

    def fake_autoscaler(bundles):
        asked.append(list(bundles))
        if bundles and not released:
            def boot():  # the node is up a while after the campaign started working: its CPU appears
                deadline = time.time() + 120
                while not (tmp_path / "calls.jsonl").exists() and time.time() < deadline:
                    time.sleep(0.1)
                time.sleep(1.0)
                released["at"] = time.time()
                Path(tmp_path / "released").touch()
                remove_placement_group(blocker)
            released["timer"] = threading.Thread(target=boot, daemon=True)
            released["timer"].start()
        return True

    monkeypatch.setattr(cluster.placement, "request_capacity", fake_autoscaler)
    logged = type("LoggedEvaluator", (Logged,), {"log_dir": str(tmp_path)})
    result = Campaign(config, progress=False, evaluator_cls=logged).run()
    released["timer"].join()

    assert asked[0] == [{"CPU": 1.0}, {"CPU": 1.0}]  # both replicas were asked for
    assert asked[-1] == []  # and the request withdrawn at the end
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    first_pid = calls[0]["pid"]
    assert calls[0]["start"] < released["at"]  # the campaign started before the second replica existed
    later = {c["pid"] for c in calls} - {first_pid}
    assert len(later) == 1, f"the second replica never worked ({len(calls)} calls, all by {first_pid})"
    assert min(c["start"] for c in calls if c["pid"] in later) > released["at"]
    assert json.loads((result.run_dir / "path.json").read_text())["steps"]
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # every replica and group freed
