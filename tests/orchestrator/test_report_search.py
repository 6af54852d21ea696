"""The report's Optuna section and pareto.png, from a real (in-process) searcher's search.json."""

from __future__ import annotations

import dataclasses
import json

from orchestrator.files import write_json
from orchestrator.plots import pareto_front
from orchestrator.report import write_report
from orchestrator.search.optuna_search import OptunaSearcher
from search_spaces import dense_params
from tests.orchestrator.test_optuna_search import drive, fake_ppl
from tests.tiny import tiny_arch


def test_pareto_front_keeps_what_nothing_beats():
    points = [(0.1, 5.0), (0.2, 6.0), (0.2, 7.0), (0.15, 5.5), (0.12, 9.0), (0.2, 6.0), (0.1, 5.0)]
    assert pareto_front(points) == [0, 6, 3, 1, 5]  # by ratio; equal points both kept
    assert pareto_front([]) == []


def test_report_has_the_study_section_and_pareto_png(tmp_path):
    arch = tiny_arch("llama")
    searcher = OptunaSearcher(arch, 0.3, trials=12, batch=3, storage=tmp_path / "optuna.journal")
    drive(searcher, lambda m: fake_ppl(m) * (0.5 if m.attn_removed == {1, 2, 3} else 1.0))
    write_json(tmp_path / "search.json", searcher.summary())
    write_json(tmp_path / "path.json", {
        "dense_ppl": searcher.dense_ppl, "dense_params": dense_params(arch), "target_ratio": 0.3,
        "steps": [s.to_dict() for s in searcher.path], "arch": dataclasses.asdict(arch),
        "heldout": {"dense_ppl": 9.0, "pruned_ppl": 12.0, "blockpruner_ppl": 13.0}})
    report = write_report(tmp_path).read_text()
    search = json.loads((tmp_path / "search.json").read_text())
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert "## Optuna study" in report and "optuna-dashboard optuna.journal" in report
    if search["improved"]:
        assert "Optuna improved on BlockPruner" in report and "Optuna trial" in report  # the path's last step
        assert "| Optuna best |" in report and "12.000 |" in report
    else:
        assert "did not improve" in report
