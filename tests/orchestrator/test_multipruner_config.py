"""MultiPruner's config: ``search.stage_stop`` and ``search.kv_weight`` (MultiPruner's behaviour by
default), and MLP groups that need not divide the width."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, SearchConfig
from orchestrator.config_load import load_config
from orchestrator.search import MultiPrunerSearcher, make_searcher
from tests.orchestrator.test_multipruner_published import LLAMA2_7B
from tests.tiny import tiny_arch

BASE = ["name=mp", "model=llama2-7b", "search.method=multipruner", "search.target_ratio=0.22"]


def load(*overrides):
    return load_config(None, [*BASE, *overrides], check_model=lambda m: LLAMA2_7B)


def test_defaults_are_multipruners_and_the_earlier_rules_are_one_setting_away():
    search = load().search
    assert (search.stage_stop, search.kv_weight) == ("overshoot", "n_rep")
    search = load("search.stage_stop=within", "search.kv_weight=once").search
    assert (search.stage_stop, search.kv_weight) == ("within", "once")


def test_bad_values_are_named_with_their_options():
    with pytest.raises(ConfigError) as info:
        load("search.stage_stop=sometimes", "search.kv_weight=twice")
    message = str(info.value)
    assert "search.stage_stop" in message and "overshoot, within" in message
    assert "search.kv_weight" in message and "n_rep, once" in message


def test_groups_of_1024_are_accepted_on_11008_and_a_group_must_leave_a_step():
    assert load("search.mlp_group=1024").search.mlp_group == 1024
    assert load().search.mlp_group is None  # the family default: MultiPruner's 1024 (search_spaces.budget)
    with pytest.raises(ConfigError, match="search.mlp_group 11008 must be between 1 and 11007"):
        load("search.mlp_group=11008")


def test_the_searcher_of_a_config_runs_multipruners_loop_by_default():
    searcher = make_searcher(SearchConfig(method="multipruner", target_ratio=0.3, mlp_group=20), tiny_arch("llama"))
    assert isinstance(searcher, MultiPrunerSearcher) and searcher.stage_stop == "overshoot"
    assert searcher.mlp_group == 20  # does not divide 48
