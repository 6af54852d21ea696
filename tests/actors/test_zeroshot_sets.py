"""The papers' named zero-shot task sets (``--tasks blockpruner``) and their average (actors/zeroshot.py)."""

from __future__ import annotations

import importlib.util

import pytest

from actors.zeroshot import TASK_SETS, expand_tasks, paper_average

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def test_the_sets_are_the_papers_tasks():
    five = {"piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"}
    assert set(TASK_SETS["blockpruner"]) == set(TASK_SETS["multipruner"]) == five
    assert set(TASK_SETS["sprint"]) == five - {"winogrande"} | {"boolq"}


def test_a_set_expands_in_place_once_and_other_tasks_are_kept():
    tasks, sets = expand_tasks(["my_task.yaml", "sprint", "blockpruner", "piqa"])
    assert tasks == ["my_task.yaml", "piqa", "hellaswag", "arc_challenge", "arc_easy", "boolq", "winogrande"]
    assert sets == ["sprint", "blockpruner"]
    assert expand_tasks(["piqa", "boolq"]) == (["piqa", "boolq"], [])


def test_the_average_takes_acc_norm_where_a_task_has_it():
    results = {"piqa": {"acc": 0.70, "acc_norm": 0.80, "samples": 10.0}, "winogrande": {"acc": 0.60, "samples": 20.0}}
    assert paper_average(results, ["piqa", "winogrande"]) == {"acc": pytest.approx(0.70), "samples": 30.0}
    with pytest.raises(ValueError, match="'boolq' has no acc or acc_norm"):
        paper_average(results, ["piqa", "boolq"])


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval is an optional extra (rayprune[eval])")
def test_every_task_of_a_set_is_registered_with_lm_eval():
    from lm_eval.tasks import TaskManager

    from actors.zeroshot import check_tasks

    registered = set(TaskManager().all_tasks)
    for name, tasks in TASK_SETS.items():
        assert set(tasks) <= registered, name
        check_tasks([name])
