"""``rayprune eval --protocol``: the held-out windows a paper's table reports (WikiText-2 test cut
as its code cuts it), for any model; a run evaluates with its own protocol by default."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.eval_model import Target, _run_evaluation, evaluate_model, format_result
from tests.orchestrator.data import paper_samplers as ref
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from actors.models import load_model, load_tokenizer

    root = tmp_path_factory.mktemp("eval-protocol")
    path = save_tiny("llama", root / "model")
    rows = ref.wikitext_rows(12, seed=3)
    return {"target": Target(load_model(path, dtype=torch.float32), load_tokenizer(path), "dense", str(path)),
            "rows": rows, "raw": ref.write_wikitext_raw(root / "wiki.test.raw", rows)}


def test_a_paper_protocol_scores_the_papers_windows(dense):
    target, length = dense["target"], 40
    expected = ref.wikitext2_test(dense["rows"], target.tokenizer, length)
    result = evaluate_model(target, protocol="multipruner", corpus=str(dense["raw"]), length=length)
    held = result["heldout"]
    assert held["protocol"] == "multipruner" and held["windows"] == len(expected) > 2
    assert held["tokens"] == len(expected) * (length - 1) and math.isfinite(held["ppl"])
    assert "consecutive windows of 40 tokens as the multipruner protocol cuts them" in format_result(result)
    with torch.no_grad():  # the same windows, scored by hand
        ids = torch.as_tensor(expected)
        loss = target.model(ids, labels=ids).loss.item()
    assert held["ppl"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_a_runs_protocol_is_its_default_and_a_bad_one_is_named(dense):
    config = {"data": {"protocol": "sprint", "corpus": "x", "evaluation": {"corpus": str(dense["raw"]),
                                                                           "sequences": None, "length": 32, "seed": 0}}}
    settings = _run_evaluation(config)
    assert settings["protocol"] == "sprint" and settings["corpus"] == str(dense["raw"])
    run = Target(dense["target"].model, dense["target"].tokenizer, "run export", "r", settings, {"pruned_ppl": 1.0})
    result = evaluate_model(run)
    assert result["heldout"]["protocol"] == "sprint" and result["heldout"]["length"] == 32
    assert result["recorded_heldout"] == {"pruned_ppl": 1.0}  # the run's own windows: its figures compare
    assert "recorded_heldout" not in evaluate_model(run, length=16)
    with pytest.raises(ValueError, match="protocol 'wikitext' is not one of"):
        evaluate_model(run, protocol="wikitext")
