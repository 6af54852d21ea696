"""MultiPruner's two calibration sets (issue "Faithful to the papers", item 3): under
``data.protocol: multipruner`` the block stage is scored on the 256 rows drawn last
(``calibration``), the width stages on the 128 drawn first (``calibration_width``), as
run_multipruner.py does."""

from __future__ import annotations

import json

import pytest

from orchestrator.cache import EvalCache
from orchestrator.config_load import load_config
from orchestrator.search.multipruner import MultiPrunerSearcher
from orchestrator.search.racing import RacingSearcher
from search_spaces import Mask
from tests.orchestrator.data import paper_samplers as ref
from tests.tiny import tiny_arch


def drive_labels(searcher) -> list[tuple[str, str | None]]:
    """(label, window set) of every proposal, scores: fewer blocks and wider layers are better."""
    seen = []
    while (proposal := searcher.suggest()) is not None:
        seen.append((proposal.label, proposal.window_set))
        searcher.observe({m: 10.0 + len(m.attn_removed) + 2 * len(m.mlp_removed)
                          + sum(1 / w for _, w in m.mlp_width) + sum(1 / u for _, u in m.head_units)
                          for m in proposal.masks})
    return seen


@pytest.mark.parametrize("racing", [False, True])
def test_width_stages_are_scored_on_their_own_rows(racing):
    inner = MultiPrunerSearcher(tiny_arch("llama"), 0.3, (0.4, 0.5, 0.1), 16, 1, width_windows="calibration_width")
    seen = drive_labels(RacingSearcher(inner, windows=2, keep=2) if racing else inner)
    blocks = {ws for label, ws in seen if "(blocks)" in label or label.startswith("start")}
    widths = {ws for label, ws in seen if "(mlp width)" in label or "(heads)" in label}
    assert blocks == {None} and widths == {"calibration_width"}  # None: the run's calibration set


@pytest.mark.ray
def test_a_multipruner_protocol_campaign_scores_each_stage_on_its_set(ray_session, tmp_path):
    from orchestrator.campaign import Campaign
    from tests.tiny import save_tiny

    model, alpaca = save_tiny("llama", tmp_path / "model"), ref.write_alpaca(tmp_path / "alpaca.jsonl")
    test = ref.write_wikitext_raw(tmp_path / "wiki.test.raw", ref.wikitext_rows(12, seed=2))
    config = load_config(None, [
        "name=mp-protocol", f"model={model}", f"output={tmp_path / 'run'}", "search.method=multipruner",
        "search.target_ratio=0.3", "search.split=[0.4, 0.5, 0.1]", "search.mlp_group=16", "search.batch_size=2",
        "cluster.actors=2", "export=false", "data.protocol=multipruner", f"data.corpus={alpaca}",
        "data.calibration={rows: 6, width_rows: 4, length: 48}",
        f"data.evaluation={{corpus: {test}, length: 48, sequences: 3}}"])
    result = Campaign(config, progress=False).run()
    rows = EvalCache(result.run_dir / "evals", flush_every=None).rows()
    by_set: dict[str, set[str]] = {}
    for row in rows:
        mask = Mask.from_json(row["mask_json"])
        kind = "width" if mask.mlp_width or mask.head_units else "blocks"
        by_set.setdefault(row["calibration_fp"], set()).add(kind)
    path = json.loads((result.run_dir / "path.json").read_text())
    kinds = {s["kind"] for s in path["steps"]}
    assert kinds & {"attn", "mlp"} and kinds & {"mlp_width", "attn_width"}
    # Three window sets: block candidates on one, width candidates on another, held-out on the third.
    assert len(by_set) == 3 and {"width"} in by_set.values()
    assert any("blocks" in kinds and "width" not in kinds for kinds in by_set.values())
