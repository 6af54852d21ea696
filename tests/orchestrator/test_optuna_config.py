"""Config keys of the Optuna search and MultiPruner's stage order, validated like the others."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError
from orchestrator.config_load import dump_yaml, load_config
from orchestrator.search import MultiPrunerSearcher, make_searcher
from orchestrator.search.optuna_search import OptunaSearcher
from tests.orchestrator.test_config import SMOLLM2
from tests.tiny import tiny_arch

BASE = ["name=demo", "model=smollm2-135m", "search.method=optuna", "search.target_ratio=0.1"]


def load(*overrides: str):
    return load_config(None, [*BASE, *overrides], check_model=lambda model: SMOLLM2)


def test_defaults_and_round_trip(tmp_path):
    config = load("output=" + str(tmp_path / "run"), "search.order=mlp,blocks,heads")
    search = config.search
    assert (search.trials, search.batch, search.sampler, search.seed) == (100, None, "tpe", 0)
    assert (search.ratio_tolerance, search.widths, search.warm_start) == (None, False, "blockpruner")
    assert search.order == ("mlp", "blocks", "heads")
    dump_yaml(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml", check_model=lambda model: SMOLLM2) == config


def test_every_bad_key_is_reported_with_its_fix():
    with pytest.raises(ConfigError) as info:
        load("search.sampler=cmaes", "search.warm_start=greedy", "search.trials=0", "search.batch=-1",
             "search.ratio_tolerance=2", "search.widths=maybe", "search.order=blocks,mlp")
    message = str(info.value)
    assert "8 problems" not in message and "7 problems" in message
    for fragment in ("search.sampler 'cmaes' is not one of tpe, nsga2; use e.g. search.sampler=tpe",
                     "search.warm_start 'greedy' is not one of blockpruner, none",
                     "search.trials 0 is not a positive integer", "search.batch -1 is not a positive integer",
                     "search.ratio_tolerance 2 is not strictly between 0 and 1",
                     "search.widths 'maybe' is not true or false",
                     "search.order 'blocks,mlp' must name each of blocks, mlp, heads once"):
        assert fragment in message


def test_band_checks_against_the_model():
    with pytest.raises(ConfigError, match="search.ratio_tolerance 0.001 is narrower than the largest single change"):
        load("search.ratio_tolerance=0.001", "search.warm_start=none")
    with pytest.raises(ConfigError, match="may leave BlockPruner's mask"):
        load("search.ratio_tolerance=0.005", "search.widths=true", "search.mlp_group=256")
    load("search.ratio_tolerance=0.005", "search.widths=true", "search.mlp_group=256", "search.warm_start=none")
    with pytest.raises(ConfigError, match="search.target_ratio 0.9 cannot be reached"):
        load("search.target_ratio=0.9")


def test_make_searcher_builds_what_the_config_says(tmp_path):
    arch = tiny_arch("llama")
    config = load_config(None, [*BASE[:2], "search.method=optuna", "search.target_ratio=0.3", "search.sampler=nsga2",
                                "search.trials=5"])
    searcher = make_searcher(config.search, arch, run_dir=tmp_path, pool_size=3)
    assert isinstance(searcher, OptunaSearcher)
    assert (searcher.batch, searcher.trials, searcher.sampler_name) == (6, 5, "nsga2")  # two asks per evaluator
    assert searcher.storage_path == tmp_path / "optuna.journal"
    multi = load_config(None, [*BASE[:2], "search.method=multipruner", "search.target_ratio=0.3", "search.split=40:50:10",
                               "search.mlp_group=16", "search.order=mlp,heads,blocks"])
    greedy = make_searcher(multi.search, arch)
    assert isinstance(greedy, MultiPrunerSearcher)
    assert [s.name for s in greedy.stages] == ["mlp width", "heads", "blocks"]
    assert [s.budget for s in greedy.stages] == pytest.approx([0.15, 0.18, 0.3])  # cumulative in run order
