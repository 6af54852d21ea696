"""Recovery settings: MultiPruner's recipe by default, one error listing every problem, a campaign section."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError
from orchestrator.config_load import load_config, to_yaml
from orchestrator.recovery_config import DEFAULT_TARGETS, RecoveryConfig, load_recovery

CAMPAIGN = ["name=r", "model=smollm2-135m", "search.target_ratio=0.1"]


def test_the_defaults_are_multipruners_recipe():
    s = load_recovery(None, [])
    assert (s.r, s.alpha, s.dropout, s.targets) == (16, 32.0, 0.05, DEFAULT_TARGETS)
    assert (s.batch_size, s.grad_accum, s.global_batch, s.lr, s.epochs, s.warmup_steps, s.max_length,
            s.val_rows, s.seed) == (8, 4, 32, 1e-4, 2, 100, 256, 2000, 42)
    assert s.data == "hf:yahma/alpaca-cleaned:train" and s.format == "auto"


def test_overrides_with_or_without_the_section_prefix():
    s = load_recovery({"r": 8}, ["recovery.lr=2e-4", "targets=q_proj,v_proj", "max_steps=10", "workers=2"])
    assert (s.r, s.lr, s.targets, s.max_steps, s.workers) == (8, 2e-4, ("q_proj", "v_proj"), 10, 2)


def test_every_problem_in_one_error():
    with pytest.raises(ConfigError) as caught:
        load_recovery(None, ["r=0", "dropout=1.5", "lrr=1", "format=csv"])
    text = str(caught.value)
    for expected in ("recovery.r 0", "recovery.dropout 1.5", "recovery.lrr: unknown key; did you mean recovery.lr?",
                     "recovery.format 'csv'"):
        assert expected in text
    with pytest.raises(ConfigError, match="must be a multiple of it"):
        load_recovery(None, ["batch_size=3", "workers=2"])


def test_a_campaign_section_round_trips_and_needs_the_export():
    config = load_config(None, [*CAMPAIGN, "recovery.data=run", "recovery.max_steps=5"])
    assert isinstance(config.recovery, RecoveryConfig) and config.recovery.max_steps == 5
    assert load_config(None, CAMPAIGN).recovery is None  # no section: no recovery
    import yaml

    raw = yaml.safe_load(to_yaml(config))
    assert raw["recovery"]["max_steps"] == 5
    with pytest.raises(ConfigError, match="export: false does not write"):
        load_config(None, [*CAMPAIGN, "export=false", "recovery.data=run"])
