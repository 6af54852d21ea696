"""SPRINT's config keys: a speedup or ratio target, the search.sprint section, the shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, SprintConfig
from orchestrator.config_load import dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]
BASE = ["name=s", "model=m", "search.method=sprint"]


def problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    return str(error.value)


def test_sprint_stops_at_a_speedup_or_a_ratio(tmp_path):
    config = load_config(None, [*BASE, "search.target_speedup=1.3", "search.sprint.top_k=3"])
    assert config.search.target_speedup == 1.3 and config.search.target_ratio is None
    assert config.search.sprint == SprintConfig(top_k=3)
    both = load_config(None, [*BASE, "search.target_speedup=1.3", "search.target_ratio=0.2", "output=" + str(tmp_path / "o")])
    assert load_config(dump_yaml(both, tmp_path / "config.yaml")) == both  # the resolved YAML loads back equal
    assert "search.target_ratio: missing" in problems(BASE) and "search.target_speedup=1.3" in problems(BASE)


def test_target_speedup_is_checked_and_only_for_sprint():
    assert "search.target_speedup 0.9 is not above 1" in problems([*BASE, "search.target_speedup=0.9"])
    message = problems(["name=s", "model=m", "search.target_ratio=0.1", "search.target_speedup=1.2"])
    assert "only search.method=sprint estimates latency" in message
    assert "search.target_ratio: missing" in problems(["name=s", "model=m"])  # still required elsewhere
    message = problems([*BASE, "search.target_speedup=2", "search.sprint.ridge=-1", "search.sprint.topk=3"])
    assert "search.sprint.ridge -1 must be >= 0" in message
    assert "search.sprint.topk: unknown key; did you mean search.sprint.top_k?" in message


def test_shipped_config_loads():
    config = load_config(ROOT / "configs" / "sprint-smollm2.yaml")
    assert config.search.method == "sprint" and config.search.sprint.top_k == 5
    assert config.data.calibration.sequences == 2 and config.cluster.actors == 1


def test_sprints_own_semantics_are_the_defaults_and_the_earlier_ones_a_setting():
    sprint = load_config(None, [*BASE, "search.target_speedup=1.3"]).search.sprint
    assert (sprint.metric, sprint.reference, sprint.refit_target, sprint.memory, sprint.no_mlp_score) == \
        ("l1", "window", "local", True, "inf")
    assert (sprint.latency_prompt, sprint.latency_generate, sprint.latency_fixed) == (1024, 512, False)
    earlier = [f"search.sprint.{k}={v}" for k, v in (("metric", "l2"), ("reference", "current"), ("refit_target", "dense"),
                                                     ("memory", "false"), ("no_mlp_score", "untuned"),
                                                     ("latency_prompt", 512), ("latency_generate", 0),
                                                     ("latency_fixed", "true"))]
    old = load_config(None, [*BASE, "search.target_speedup=1.3", *earlier]).search.sprint
    assert old == SprintConfig(metric="l2", reference="current", refit_target="dense", memory=False,
                               no_mlp_score="untuned", latency_prompt=512, latency_generate=0, latency_fixed=True)
    message = problems([*BASE, "search.target_speedup=1.3", "search.sprint.metric=l3", "search.sprint.memory=3",
                        "search.sprint.refit_target=global", "search.sprint.reference=dense"])
    assert "search.sprint.metric 'l3' is not one of l1, l2; use e.g. search.sprint.metric=l1" in message
    assert "search.sprint.memory 3 is not true or false" in message
    assert "search.sprint.refit_target 'global' is not one of local, dense" in message
    assert "search.sprint.reference 'dense' is not one of window, current" in message
