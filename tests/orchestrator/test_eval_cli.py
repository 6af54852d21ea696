"""``rayprune eval``: held-out perplexity of runs, exports and dense models; zero-shot on a local task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from actors.engine import Engine
from actors.export import export_compact
from actors.forward import LeanDecoder
from actors.heldout import perplexity
from tests.tiny import reorder_by_l1_
from orchestrator import cli
from orchestrator.data.windows import heldout_windows
from search_spaces import Mask, param_count, ratio
from tests.tiny import char_tokenizer, save_tiny, tiny_arch, tiny_model, write_corpus

MASK = Mask(attn_removed={0}, mlp_removed={2}, mlp_width={1: 16})
TASK = Path(__file__).resolve().parents[1] / "data" / "tiny_mc.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as a finished campaign leaves it: config.yaml, path.json and model/."""
    root = tmp_path_factory.mktemp("eval")
    dense = save_tiny("llama", root / "dense")
    corpus = write_corpus(root / "corpus.txt")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"name: run\nmodel: {dense}\ndata:\n  corpus: {corpus}\n  evaluation: {{sequences: 4, length: 32, seed: 5}}\n"
        f"search: {{method: blockpruner, target_ratio: 0.2}}\n")
    arch = tiny_arch("llama")
    step = {"step": 1, "kind": "attn", "layer": 0, "ppl": 90.0, "ratio": ratio(MASK, arch),
            "params": param_count(MASK, arch), "mask": MASK.to_dict()}
    (run / "path.json").write_text(json.dumps({
        "dense_ppl": 80.0, "dense_params": 1, "target_ratio": 0.2, "steps": [step],
        "heldout": {"dense_ppl": 1.0, "pruned_ppl": 2.0}, "evaluations": {}, "seconds": 1.0}))
    export_compact(dense, MASK, run / "model")
    return {"run": run, "dense": dense, "corpus": corpus}


def engine_ppl(mask: Mask, corpus: str, sequences: int, length: int, seed: int) -> float:
    """What an evaluator replica (L1-reordered dense model + mask, prefix-reuse engine) reports."""
    arch = tiny_arch("llama")
    windows = torch.as_tensor(heldout_windows(char_tokenizer(), corpus, sequences, length, seed))
    engine = Engine(LeanDecoder(reorder_by_l1_(tiny_model("llama"), arch), arch), batch_size=2)
    return perplexity(engine.score_masks(windows, [mask])[0])


def eval_json(capsys, *args: str) -> dict:
    assert cli.main(["eval", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_run_directory_uses_its_export_and_its_evaluation_settings(run_dir, capsys):
    result = eval_json(capsys, run_dir["run"])
    held = result["heldout"]
    assert result["kind"] == "run export" and result["params"] == param_count(MASK, tiny_arch("llama"))
    assert (held["corpus"], held["sequences"], held["length"], held["seed"]) == (run_dir["corpus"], 4, 32, 5)
    assert held["tokens"] == 4 * 31
    assert held["ppl"] == pytest.approx(engine_ppl(MASK, run_dir["corpus"], 4, 32, 5), rel=1e-5)
    assert result["recorded_heldout"] == {"dense_ppl": 1.0, "pruned_ppl": 2.0}


def test_run_without_export_applies_its_final_mask_in_memory(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run, ignore=shutil.ignore_patterns("model"))
    result = eval_json(capsys, run, "--sequences", 3)
    assert result["kind"] == "run (masked in memory)" and "recorded_heldout" not in result  # other windows
    assert result["heldout"]["ppl"] == pytest.approx(engine_ppl(MASK, run_dir["corpus"], 3, 32, 5), rel=1e-5)


def test_a_run_is_evaluated_in_the_dtype_its_search_ran_in(run_dir, tmp_path, capsys):
    """path.json says bfloat16: eval rebuilds the run in bf16 (its figure repeats the run's), and
    --dtype overrides; the fp32 and bf16 figures agree within bf16's precision."""
    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run, ignore=shutil.ignore_patterns("model"))
    path = json.loads((run / "path.json").read_text())
    (run / "path.json").write_text(json.dumps({**path, "dtype": "bfloat16"}))
    bf16 = eval_json(capsys, run)
    fp32 = eval_json(capsys, run, "--dtype", "float32")
    assert (bf16["dtype"], fp32["dtype"]) == ("bfloat16", "float32")
    assert fp32["heldout"]["ppl"] == pytest.approx(engine_ppl(MASK, run_dir["corpus"], 4, 32, 5), rel=1e-5)
    assert bf16["heldout"]["ppl"] == pytest.approx(fp32["heldout"]["ppl"], rel=0.02)
    assert bf16["heldout"]["ppl"] != fp32["heldout"]["ppl"]
    export = eval_json(capsys, run_dir["run"], "--dtype", "bfloat16")  # an export is cast on request
    assert export["dtype"] == "bfloat16" and export["kind"] == "run export"


def test_dense_directory_and_export_directory(run_dir, capsys):
    flags = ["--corpus", run_dir["corpus"], "--sequences", 2, "--length", 24, "--seed", 0]
    dense = eval_json(capsys, run_dir["dense"], *flags)
    assert dense["kind"] == "dense" and dense["heldout"]["tokens"] == 2 * 23
    assert dense["heldout"]["ppl"] == pytest.approx(engine_ppl(Mask(), run_dir["corpus"], 2, 24, 0), rel=1e-5)
    compact = eval_json(capsys, run_dir["run"] / "model", *flags)
    assert compact["kind"] == "compact export"
    assert compact["heldout"]["ppl"] == pytest.approx(engine_ppl(MASK, run_dir["corpus"], 2, 24, 0), rel=1e-5)


def test_human_output(run_dir, capsys):
    assert cli.main(["eval", str(run_dir["run"])]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity:" in out and "4 x 32 tokens, seed 5" in out
    assert "recorded by the run (same windows): dense 1.000 -> pruned 2.000" in out


def test_zero_shot_without_the_extra_says_how_to_install(monkeypatch):
    import sys

    from actors.zeroshot import zero_shot

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ValueError, match=r"rayprune\[eval\]"):
        zero_shot(None, None, [str(TASK)])


def own_accuracy(model, tokenizer, task_file: Path) -> float:
    """Zero-shot multiple-choice accuracy computed by hand: the choice with the highest summed
    log-likelihood after the question (and lm_eval's target delimiter, one space) wins."""
    docs = [json.loads(line) for line in (task_file.parent / "tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    with torch.inference_mode():
        for doc in docs:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            scores = []
            for choice in doc["choices"]:
                continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([context + continuation])  # (1, T)
                logp = model(ids).logits[0, len(context) - 1 : -1].float().log_softmax(-1)  # (len(cont), V)
                scores.append(logp.gather(-1, torch.tensor(continuation)[:, None]).sum().item())
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_zero_shot_accuracy_on_a_local_task(run_dir, capsys):
    pytest.importorskip("lm_eval")
    from actors.export import load_pruned
    from actors.models import load_tokenizer

    result = eval_json(capsys, run_dir["run"], "--sequences", 1, "--tasks", TASK)
    metrics = result["tasks"]["rayprune_tiny_mc"]
    assert metrics["samples"] == 20 and 0.0 <= metrics["acc"] <= 1.0
    model_dir = run_dir["run"] / "model"
    assert metrics["acc"] == pytest.approx(own_accuracy(load_pruned(model_dir), load_tokenizer(model_dir), TASK))


def test_a_missing_task_file_fails_before_any_model_loads(capsys):
    pytest.importorskip("lm_eval")
    assert cli.main(["eval", "./no/such/model", "--tasks", "nope.yaml"]) == 2
    assert "task file nope.yaml does not exist" in capsys.readouterr().err


@pytest.mark.ray
def test_on_the_cluster_the_model_loads_on_a_worker_not_the_driver(ray_session, run_dir, tmp_path, capsys):
    """``--on cluster`` (the default with RAY_ADDRESS): a Ray task loads and evaluates; same figures."""
    import os

    run = tmp_path / "run"
    shutil.copytree(run_dir["run"], run, ignore=shutil.ignore_patterns("model"))  # rebuilt in memory there
    here = eval_json(capsys, run, "--on", "driver")
    there = eval_json(capsys, run, "--on", "cluster", "--gpus", 0)
    assert int(there["worker"].rsplit(":", 1)[1]) != os.getpid() and there["device"] == "cpu"
    assert there["kind"] == here["kind"] == "run (masked in memory)"
    assert there["heldout"]["ppl"] == pytest.approx(here["heldout"]["ppl"], rel=1e-6)
    assert there["heldout"]["tokens"] == here["heldout"]["tokens"]


def test_a_path_the_worker_cannot_see_is_named_with_the_fix(tmp_path):
    from orchestrator.eval_remote import evaluate_here

    with pytest.raises(FileNotFoundError, match=r"not on the worker .*shared storage.*--on driver"):
        evaluate_here(str(tmp_path / "gone"), None, {}, path=True)
