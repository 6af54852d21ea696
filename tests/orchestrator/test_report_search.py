"""The report's Optuna and racing sections and pareto.png, from real (in-process) searchers' search.json."""

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


def raced_report(tmp_path, probes: int) -> str:
    """The report of a raced BlockPruner run whose first round hides step 1's best candidate (MLP 0)."""
    from orchestrator.search import BlockPrunerSearcher
    from orchestrator.search.racing import RacingSearcher
    from tests.orchestrator.test_evolution import ARCH
    from tests.orchestrator.test_racing import looks_second_best

    racing = RacingSearcher(BlockPrunerSearcher(ARCH, 0.16), windows=4, keep=1, min_margin=0.0, probes=probes,
                            audit=True)
    while (proposal := racing.suggest()) is not None:
        racing.observe({m: looks_second_best(m, proposal.fidelity) for m in proposal.masks})
    write_json(tmp_path / "search.json", racing.summary())
    write_json(tmp_path / "path.json", {
        "dense_ppl": racing.dense_ppl, "dense_params": dense_params(ARCH), "target_ratio": 0.16,
        "steps": [s.to_dict() for s in racing.path], "arch": dataclasses.asdict(ARCH),
        "heldout": {"dense_ppl": 9.0, "pruned_ppl": 12.0}})
    return write_report(tmp_path).read_text()


def test_report_has_the_racing_section_with_probes_and_the_audit(tmp_path):
    blind = raced_report(tmp_path / "blind", probes=0)
    assert "## Racing" in blind and "in a round on 4 calibration windows" in blind and "no probes" in blind
    assert "racing changed 1 decision:" in blind  # the cut lost MLP 0 at step 1 ...
    assert "- step 1: racing took attention 0 (calibration 11.000), the exact step MLP 0 (10.500)" in blind
    probed = raced_report(tmp_path / "probed", probes=1)
    assert "plus 1 probe per cut" in probed
    assert "| steps won by a probe (the cut alone would have lost them) | 1 |" in probed
    assert "racing changed 0 decisions." in probed  # ... the probe brought it back


def test_an_exact_greedy_run_has_no_racing_section(tmp_path):
    from orchestrator.search import BlockPrunerSearcher
    from tests.orchestrator.test_evolution import ARCH, trap

    exact = BlockPrunerSearcher(ARCH, 0.16)
    while (proposal := exact.suggest()) is not None:
        exact.observe({m: trap(m) for m in proposal.masks})
    assert exact.summary() is None  # no search.json, so no section
    write_json(tmp_path / "path.json", {
        "dense_ppl": exact.dense_ppl, "dense_params": dense_params(ARCH), "target_ratio": 0.16,
        "steps": [s.to_dict() for s in exact.path], "arch": dataclasses.asdict(ARCH), "heldout": {}})
    assert "## Racing" not in write_report(tmp_path).read_text()
