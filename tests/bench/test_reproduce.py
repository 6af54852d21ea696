"""bench/reproduce/llama2_7b.py: the plan of the Llama-2-7B reproduction, the configs it writes, its
table, the published pruning config it applies, its refusals, and (marked ``ray``) one whole run on a
tiny model with local protocol files, on CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.reproduce import llama2_7b, runner, table
from bench.reproduce.plan import PUBLISHED_CONFIG, ROWS, Options, build_plan
from bench.reproduce.published import LLAMA2_7B_PARAMS, PUBLISHED
from orchestrator import cli
from orchestrator.config_load import load_config
from tests.orchestrator.data import paper_samplers as ref
from tests.orchestrator.test_multipruner_published import DATA, LLAMA2_7B
from tests.tiny import save_tiny

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "reproduce" / "llama2_7b.py"
SEARCH_ROWS = ("blockpruner", "multipruner", "sprint")


@pytest.fixture
def llama2_dir(tmp_path) -> Path:
    """A directory holding Llama-2-7B's config.json alone: enough for inspect and config checks."""
    model = tmp_path / "Llama-2-7b-hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    return model


def steps_by_id(options: Options) -> dict:
    return {step.id: step for step in build_plan(options)}


def test_the_dry_run_lists_every_row_with_its_protocol_target_and_settings(tmp_path, capsys):
    out = tmp_path / "out"
    assert llama2_7b.main(["--dry-run", "--out", str(out), "--gpus-per-actor", "2", "--actors", "4"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written, nothing run
    rows = [line.split(":")[0] for line in printed.splitlines() if line.split(":")[0] in ROWS]
    assert rows == ["dense", "multipruner-published", "sprint", "multipruner", "blockpruner"]  # cheapest first
    for name, protocol, target, dtype in [("blockpruner", "blockpruner", "ratio 0.2199", "bfloat16"),
                                          ("multipruner", "multipruner", "ratio 0.22", "float16"),
                                          ("sprint", "sprint", "speedup 1.41x", "float16"),
                                          ("multipruner-published", "multipruner",
                                           "llama-2-7b.ratio_22.pruning_config.json", "float16")]:
        line = next(l for l in printed.splitlines() if l.startswith(f"{name}:"))
        assert f"protocol {protocol}; target {target}; dtype {dtype}" in line
        assert f"--protocol {protocol} --json" in printed
    for name in SEARCH_ROWS:
        config = out / name / "config.yaml"
        assert f"write {config}:" in printed and f"$ rayprune run {config} --no-progress" in printed
    assert f"export meta-llama/Llama-2-7b-hf --pruning-config {PUBLISHED_CONFIG} --out {out}/multipruner-published/model " \
           f"--dtype float16" in printed
    assert "--tasks blockpruner sprint --on cluster --gpus 2" in printed  # the dense row: both papers' sets

    steps = steps_by_id(Options(out=out, gpus_per_actor=2, actors=4))
    for name in SEARCH_ROWS:
        config = steps[f"{name}/run"].config
        assert config["data"]["protocol"] == name and config["search"]["method"] == name
        assert config["cluster"] == {"actors": 4, "gpus_per_actor": 2}
        assert config["output"] == str(out / name / "run")
        assert steps[f"{name}/eval"].argv[:4] == ("eval", str(out / name / "run"), "--protocol", name)
        assert steps[f"{name}/eval"].argv[-2:] == ("--tasks", name)
    assert steps["blockpruner/run"].config["search"]["target_ratio"] == 0.2199
    assert steps["blockpruner/run"].config["dtype"] == "bfloat16"
    assert steps["multipruner/run"].config["search"] == {"method": "multipruner", "target_ratio": 0.22,
                                                               "split": None, "mlp_group": None, "head_group": None}
    assert steps["sprint/run"].config["search"]["target_speedup"] == 1.41
    assert "target_ratio" not in steps["sprint/run"].config["search"]


def test_resources_resume_and_result_settings_recompute():
    """A step's key leaves out what it runs on: more actors or GPUs resume; another dtype recomputes."""
    base = steps_by_id(Options())
    wider = steps_by_id(Options(gpus_per_actor=4, actors=2))
    other = steps_by_id(Options(dtype="float32", sprint_speedup=1.2))
    assert all(base[i].key == wider[i].key for i in base)
    assert base["sprint/run"].key != other["sprint/run"].key and base["dense/eval"].key != other["dense/eval"].key
    state = {"steps": {"dense/eval": {"status": "done", "key": base["dense/eval"].key, "seconds": 1.0}}}
    assert runner.is_done(wider["dense/eval"], state) and not runner.is_done(other["dense/eval"], state)


def test_the_runner_records_each_step_stops_a_failed_row_and_reruns_what_follows_a_change(tmp_path, llama2_dir):
    """Real ``rayprune inspect`` subprocesses (a tenth of a second each) stand in for a row's steps."""
    from bench.reproduce.plan import Step

    out, seen = tmp_path / "out", []
    first = Step("r", "inspect", ("inspect", str(llama2_dir), "--json"), parse_json=True)
    bad = Step("r", "eval", ("inspect", str(tmp_path / "missing"), "--json"), parse_json=True)
    last = Step("r", "last", ("inspect", str(llama2_dir), "--json"), parse_json=True)
    other = Step("s", "inspect", ("inspect", str(llama2_dir), "--json"), parse_json=True)
    state = runner.read_state(out)
    assert runner.execute_plan([first, bad, last, other], state, out, echo=seen.append) == ["r/eval"]
    assert state["steps"]["r/inspect"]["result"]["dense_params"] == LLAMA2_7B_PARAMS
    assert state["steps"]["r/eval"]["status"] == "failed" and state["steps"]["r/eval"]["problem"] == "exit code 2"
    assert "missing" in (out / "r" / "eval.log").read_text() and "r/last" not in state["steps"]
    assert state["steps"]["s/inspect"]["status"] == "done"  # another row still ran
    assert runner.read_state(out)["steps"] == state["steps"]  # on disk after every step

    fixed = Step("r", "eval", ("inspect", str(llama2_dir), "--pruning-config", str(PUBLISHED_CONFIG), "--json"),
                 parse_json=True)
    seen.clear()
    assert runner.execute_plan([first, fixed, last], runner.read_state(out), out, echo=seen.append) == []
    assert "[r/inspect] done in an earlier run" in seen[0] and not any("[r/last] done in an earlier" in s for s in seen)
    state = runner.read_state(out)
    assert state["steps"]["r/eval"]["result"]["kept_params"] < LLAMA2_7B_PARAMS
    seen.clear()  # a changed first step: everything after it in its row runs again
    changed = Step("r", "inspect", ("inspect", str(llama2_dir), "--pruning-config", str(PUBLISHED_CONFIG), "--json"),
                   parse_json=True)
    assert runner.execute_plan([changed, fixed, last], state, out, echo=seen.append) == []
    assert not any("done in an earlier run" in s for s in seen)
    assert [s.split("]")[0] for s in seen if s.endswith(" s") and "] done in" in s] == ["[r/inspect", "[r/eval", "[r/last"]


def test_the_configs_it_writes_load_with_load_config(tmp_path, llama2_dir):
    from actors.models import read_model_config

    tiny = save_tiny("llama", tmp_path / "tiny")
    alpaca = ref.write_alpaca(tmp_path / "alpaca.jsonl")
    train = ref.write_wikitext_raw(tmp_path / "wiki.train.raw", ref.wikitext_rows(6, seed=1))
    test = ref.write_wikitext_raw(tmp_path / "wiki.test.raw", ref.wikitext_rows(4, seed=2))
    options = Options(model=tiny, out=tmp_path / "out", alpaca=str(alpaca), wikitext_train=str(train),
                      wikitext_test=str(test), gpus_per_actor=0, actors=1,
                      sets=("search.batch_size=2", "multipruner:search.mlp_group=16"))
    for step in build_plan(options):
        if step.config is None:
            continue
        config = load_config(step.write_config(), check_model=read_model_config)
        assert config.model == tiny and config.output == str(tmp_path / "out" / step.row / "run")
        assert config.data.protocol == step.row and config.search.method == step.row
        assert config.data.corpus == str(train if step.row == "sprint" else alpaca)
        assert config.data.evaluation.corpus == str(test) and config.data.evaluation.length == 2048
        assert config.search.batch_size == 2 and config.cluster.gpus_per_actor == 0
        assert config.search.mlp_group == (16 if step.row == "multipruner" else None)
    # On Llama-2-7B's architecture, rayprune's own checks pass them too (MultiPruner's 1024-channel groups).
    for step in build_plan(Options(model=str(llama2_dir), out=tmp_path / "big")):
        if step.config is not None:
            config = load_config(step.write_config(), check_model=read_model_config)
            assert config.data.calibration.length == 2048 and config.dtype == ROWS[step.row].dtype


def test_the_table_puts_rayprunes_figures_next_to_the_published_ones_and_marks_missing_ones():
    options = Options(only=("dense", "blockpruner", "multipruner", "sprint"))
    held = {"ppl": 11.8, "protocol": "blockpruner", "length": 2048, "windows": 163, "corpus": "wikitext"}
    state = {"steps": {
        "blockpruner/run": {"status": "done", "seconds": 7200.0, "result": {"ratio": 0.2201, "steps": 40}},
        "blockpruner/eval": {"status": "done", "seconds": 600.0, "result": {
            "params": 5_256_000_000, "heldout": held, "tasks": {"blockpruner average": {"acc": 0.6}}}},
        "dense/eval": {"status": "done", "seconds": 300.0, "result": {
            "params": LLAMA2_7B_PARAMS, "heldout": {**held, "ppl": 5.472}, "tasks": {"blockpruner average": {"acc": 0.69}}}},
        "sprint/run": {"status": "done", "seconds": 900.0, "result": {"ratio": 0.18, "speedup": 1.4123}},
        "sprint/eval": {"status": "failed", "seconds": 5.0, "result": None, "problem": "exit code 1"},
    }}
    rows = table.table_rows(state, options)
    text = table.markdown(rows, options)
    line = {r.split(" | ")[0].strip("| "): r for r in text.splitlines() if r.startswith("| ")}
    assert "| 22.01% / 21.99% | 5,256,000,000 / n/a | 11.80 / 11.51 | 60.00 / 60.17 (blockpruner) | 2.0 h / 5.5 h " \
           "| 10 min |" in line["blockpruner"]
    assert "| 0.00% / 0.00% | 6,738,415,616 / 6,738,415,616 | 5.47 / 5.47 | 69.00 / 68.96 (blockpruner) |" in line["dense"]
    assert "| — / n/a (sprint) |" in line["dense (sprint tasks)"]  # measured? no; published? none
    assert "— / 9.33" in line["multipruner"] and "— / 62.83 (multipruner)" in line["multipruner"]  # not run yet
    assert "est. speedup 1.41x" in line["sprint"] and "failed / n/a" in line["sprint"] and "failed / 66.40" in line["sprint"]
    assert "15 min / 0.25 h" in line["sprint"]
    assert "sprint: step(s) eval failed." in text and "*:" not in text
    assert PUBLISHED["sprint"].note in text  # the SPRINT row's assumption is stated with the figures
    short = table.markdown(table.table_rows(
        {"steps": {"dense/eval": {"status": "done", "seconds": 1.0, "result": {"params": 9, "heldout": {**held, "length": 48}}}}},
        Options(only=("dense",), tasks=False)), Options(only=("dense",), tasks=False))
    assert "11.80 / 5.47 *" in short and "*: held-out windows other than the papers'" in short
    assert "dense (sprint tasks)" not in short and "| — / 68.96 |" in short


def test_the_published_config_it_applies_gives_the_published_parameter_count(llama2_dir, capsys):
    """The file the multipruner-published row exports is MultiPruner's (tests/data/multipruner), and its
    own inspect step gives eval.res.json's counts on Llama-2-7B (norm weights of removed blocks apart)."""
    assert PUBLISHED_CONFIG.read_bytes() == (DATA / "llama-2-7b.ratio_22.pruning_config.json").read_bytes()
    steps = steps_by_id(Options(model=str(llama2_dir)))
    inspect, export = steps["multipruner-published/inspect"], steps["multipruner-published/export"]
    assert str(PUBLISHED_CONFIG) in inspect.argv and str(PUBLISHED_CONFIG) in export.argv
    assert cli.main(list(inspect.command)) == 0
    figures = runner.last_json(capsys.readouterr().out.splitlines())
    data = json.loads(PUBLISHED_CONFIG.read_text())
    norms = LLAMA2_7B["hidden_size"] * (len(data["pruned_attn_idx"]) + len(data["pruned_mlp_idx"]))
    assert figures["dense_params"] == PUBLISHED["dense"].params == 6_738_415_616
    assert figures["kept_params"] + norms == PUBLISHED["multipruner-published"].params == 5_258_874_880
    assert figures["ratio"] == pytest.approx(PUBLISHED["multipruner-published"].ratio, abs=1e-5)


def test_it_refuses_without_a_gpu_or_cluster_and_names_bad_input(tmp_path, monkeypatch, capsys, llama2_dir):
    monkeypatch.setattr(llama2_7b, "local_gpus", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    args = ["--model", str(llama2_dir), "--out", str(out), "--no-tasks", "--only", "dense,multipruner-published"]
    assert llama2_7b.main(args) == 2
    err = capsys.readouterr().err
    assert "no GPU here and no RAY_ADDRESS" in err and "--allow-cpu" in err and not out.exists()
    options = llama2_7b.options_from(llama2_7b.parse_args(args))
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a cluster: its GPUs are the cluster's business
    assert llama2_7b.check(options, build_plan(options), dry_run=False, allow_cpu=False) == []

    assert llama2_7b.main(["--only", "blockpruner,bp", "--dry-run"]) == 2
    assert "--only: unknown row 'bp'; rows are dense, blockpruner" in capsys.readouterr().err
    assert llama2_7b.main(["--model", str(tmp_path / "no-such-model"), "--dry-run", "--set", "sprint:search.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "no such directory" in err and "row sprint: search.nope: unknown key" in err
    assert llama2_7b.main(["--model", str(llama2_dir), "--dry-run", "--pruning-config", str(tmp_path / "x.json")]) == 2
    assert "--pruning-config" in capsys.readouterr().err
    tiny = save_tiny("llama", tmp_path / "tiny")
    assert llama2_7b.main(["--model", tiny, "--dry-run", "--only", "multipruner-published"]) == 2
    err = capsys.readouterr().err  # the published Llama-2-7B file names layers a 4-layer model lacks
    assert "does not fit" in err and "outside 0..3" in err


@pytest.mark.ray
def test_the_whole_script_runs_on_a_tiny_model_with_local_protocol_files_and_resumes(tmp_path):
    tiny = save_tiny("llama", tmp_path / "model")
    alpaca = ref.write_alpaca(tmp_path / "alpaca.jsonl")  # 90 rows: 9 in the test part drawn from
    train = ref.write_wikitext_raw(tmp_path / "wiki.train.raw", ref.wikitext_rows(6, seed=1))
    test = ref.write_wikitext_raw(tmp_path / "wiki.test.raw", ref.wikitext_rows(3, seed=2))
    pruning = tmp_path / "pruning_config.json"
    pruning.write_text(json.dumps({"pruned_attn_idx": [1], "pruned_mlp_idx": [2], "pruned_attn_width": {"0": 16},
                                   "pruned_mlp_width": {"3": 32}}))
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--model", tiny, "--out", str(out), "--allow-cpu", "--no-tasks",
            "--dtype", "float32", "--actors", "1", "--pruning-config", str(pruning), "--alpaca", str(alpaca),
            "--wikitext-train", str(train), "--wikitext-test", str(test), "--eval-length", "48",
            "--set", "blockpruner:data.calibration.rows=6", "--set", "multipruner:data.calibration.rows=6",
            "--set", "multipruner:data.calibration.width_rows=4", "--set", "data.calibration.length=48",
            "--set", "data.evaluation.length=48", "--set", "sprint:data.calibration.sequences=4",
            "--set", "sprint:search.sprint.latency_prompt=32", "--set", "sprint:search.sprint.latency_generate=4",
            "--set", "search.batch_size=2", "--set", "multipruner:search.mlp_group=16"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # private sessions, never a shared one
    env["RAYPRUNE_CACHE"] = str(tmp_path / "cache")
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    state = json.loads((out / "results.json").read_text())
    assert {e["status"] for e in state["steps"].values()} == {"done"} and len(state["steps"]) == 10
    by_row = {row["row"]: row["ours"] for row in state["table"]}
    for name in ("dense", "blockpruner", "multipruner-published", "multipruner", "sprint"):
        ours = by_row[name]
        assert ours["ppl"] > 1 and ours["params"] > 0 and ours["heldout"]["length"] == 48, name
        assert ours["heldout"]["protocol"] == ROWS[name].protocol and ours["eval_seconds"] > 0
    for name in SEARCH_ROWS:  # the eval of a run repeats the figure the campaign recorded on the same windows
        run = state["steps"][f"{name}/run"]["result"]
        assert by_row[name]["ppl"] == pytest.approx(run["heldout"]["pruned_ppl"], rel=1e-5)
        assert by_row[name]["ratio"] == run["ratio"] > 0 and by_row[name]["pruning_seconds"] > 0
    assert by_row["sprint"]["speedup"] >= 1.41 and by_row["blockpruner"]["ratio"] >= 0.2199
    assert by_row["dense"]["params"] > by_row["multipruner-published"]["params"]
    assert by_row["multipruner-published"]["ratio"] > 0
    md = (out / "results.md").read_text()
    assert "| blockpruner | BlockPruner search | blockpruner |" in md and "/ 11.51 *" in md
    assert (out / "sprint" / "config.yaml").is_file() and (out / "blockpruner" / "run.log").is_file()

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("done in an earlier run") == 10 and "  | " not in again.stdout
