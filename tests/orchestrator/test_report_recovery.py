"""The report's recovery section: from recovery/result.json and recovery/log.jsonl, with the loss picture."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.plots import write_loss_curve
from orchestrator.report import write_report
from orchestrator.report_recovery import TITLE, read_log, recovery_section
from tests.orchestrator.test_report import PNG, synthetic_path, write_run

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def result(**changes) -> dict:
    """A result.json as the recovery driver writes it (the demo's figures)."""
    base = {
        "model": "runs/demo/model", "merged": "runs/demo/recovery/model", "adapter": "runs/demo/recovery/adapter",
        "data": {"source": "run", "format": "text", "train_examples": 400, "val_examples": 16, "train_tokens": 102400,
                 "train_supervised_tokens": 102400, "dropped_overlap": 3, "sequences_per_epoch": 400},
        "settings": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": TARGETS, "lr": 1e-4, "batch_size": 8,
                     "grad_accum": 4, "epochs": 2, "max_steps": None, "warmup_steps": 100, "max_length": 256,
                     "workers": 1, "dtype": "float32"},
        "heldout": {"dense": 19.85, "pruned": 35.23, "recovered": 30.1, "windows": 16, "length": 256,
                    "corpus": "wikipedia"},
        "train": {"steps": 100, "tokens_trained": 51200, "seconds": 612.3, "resumed_from_step": 40, "final_loss": 3.1},
        "tasks": None,
    }
    return {**base, **changes}


def loss_log(steps: int = 30) -> list[dict]:
    log = [{"step": s, "loss": 4.0 - 0.03 * s, "lr": 1e-4, "tokens": 512 * s, "seconds": 2.0 * s}
           for s in range(1, steps + 1)]
    log[5]["loss"] = float("nan")  # a diverged step logs NaN: left out of the picture, not a crash
    log += [{"step": 10, "val_loss": 3.8, "tokens": 5120, "seconds": 21.0},
            {"step": 20, "val_loss": 3.5, "tokens": 10240, "seconds": 41.0}]
    return log


def write_recovery(run, res: dict, log: list[dict] | None = None) -> None:
    (run / "recovery").mkdir(parents=True, exist_ok=True)
    (run / "recovery" / "result.json").write_text(json.dumps(res))
    if log is not None:
        lines = [json.dumps(e) for e in log]  # json.dumps writes NaN as NaN, as the trainer's log does
        (run / "recovery" / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 31, "lo')  # a torn last line


def test_section_with_table_facts_and_the_loss_picture(tmp_path):
    write_recovery(tmp_path, result(), loss_log())
    lines = recovery_section(tmp_path)
    text = "\n".join(lines)
    assert lines[0] == TITLE
    assert "| dense | 19.850 | |" in text and "| pruned | 35.230 | |" in text
    assert "| recovered | 30.100 | -14.56 % |" in text  # 30.1 / 35.23 - 1
    assert f"closed {(35.23 - 30.1) / (35.23 - 19.85):.1%} of the gap" in text
    assert "16 windows of 256 tokens from wikipedia" in text
    assert "400 training examples (102,400 tokens, 102,400 of them in the loss), 16 for validation" in text
    assert "3 dropped for overlapping the held-out windows" in text
    assert "100 optimizer steps on 51,200 tokens in 10 min 12 s (612 s wall time), resumed from step 40" in text
    assert "LoRA r 16, alpha 32, dropout 0.05 on " + ", ".join(TARGETS) in text
    assert "lr 0.0001" in text and "8 sequences per micro-batch x 4 accumulation = 32 per optimizer step" in text
    assert "2 epochs" in text and "1 worker;" in text and "Zero-shot" not in text
    assert "![recovery training loss](recovery/loss.png)" in text
    assert (tmp_path / "recovery" / "loss.png").read_bytes().startswith(PNG)


def test_zero_shot_side_by_side(tmp_path):
    tasks = {"pruned": {"piqa": {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": 0.62, "samples": 1838.0},
                        "arc_easy": {"acc": 0.44, "samples": 2376.0}},
             "recovered": {"piqa": {"acc": 0.635, "acc_stderr": 0.01, "acc_norm": 0.64, "samples": 1838.0},
                           "arc_easy": {"acc": 0.45, "samples": 2376.0}}}
    write_recovery(tmp_path, result(tasks=tasks, settings={**result()["settings"], "max_steps": 200}))
    text = "\n".join(recovery_section(tmp_path))
    assert "| task | metric | pruned | recovered | change | items |" in text
    assert "| piqa | acc | 0.6100 | 0.6350 | +0.0250 | 1,838 |" in text
    assert "| piqa | acc_norm | 0.6200 | 0.6400 | +0.0200 | 1,838 |" in text
    assert "| arc_easy | acc | 0.4400 | 0.4500 | +0.0100 | 2,376 |" in text
    assert "stderr" not in text and "200 steps" in text
    assert "loss.png" not in text and not (tmp_path / "recovery" / "loss.png").exists()  # no log, no picture


def test_no_section_without_result_json_and_missing_figures_read_na(tmp_path):
    assert recovery_section(tmp_path) == []
    (tmp_path / "recovery").mkdir()
    (tmp_path / "recovery" / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    assert recovery_section(tmp_path) == []  # a recovery still running: no result yet
    write_recovery(tmp_path, {"model": "m", "heldout": {"dense": 19.85, "pruned": 35.23}})
    text = "\n".join(recovery_section(tmp_path))
    assert "| recovered | n/a | |" in text and "closed" not in text
    write_recovery(tmp_path, result(heldout=None, tasks={"pruned": None, "recovered": None},  # as the driver writes
                                    train={"steps": 50, "total_steps": 200, "tokens_trained": 25600, "seconds": 30.0,
                                           "final_loss": 3.2, "final_val_loss": 3.4}))
    text = "\n".join(recovery_section(tmp_path))
    assert "| pruned | n/a | |" in text and "Zero-shot" not in text
    assert "50 of 200 optimizer steps on 25,600 tokens in 30 s" in text and "validation loss 3.400" in text


def test_write_report_ends_with_the_recovery_section(tmp_path):
    run = tmp_path / "run"
    write_run(run, synthetic_path())
    assert TITLE not in write_report(run).read_text()
    write_recovery(run, result(), loss_log())
    report = write_report(run).read_text()
    assert report.index("## Time and evaluations") < report.index(TITLE)
    assert "| recovered | 30.100 | -14.56 % |" in report and (run / "recovery" / "loss.png").is_file()


@pytest.mark.parametrize("log", [[], [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": float("inf")}],
                                 [{"step": 3, "loss": 2.0, "tokens": 10}], loss_log()],
                         ids=["empty", "no-finite-loss", "one-point", "nan-and-val"])
def test_loss_curve_never_crashes(tmp_path, log):
    write_loss_curve(log, tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG)


def test_log_reading_skips_torn_lines_and_keeps_nan(tmp_path):
    write_recovery(tmp_path, result(), loss_log(8))
    entries = read_log(tmp_path / "recovery" / "log.jsonl")
    assert [e.get("step") for e in entries] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 20]
    assert math.isnan(entries[5]["loss"]) and entries[8]["val_loss"] == 3.8
    assert read_log(tmp_path / "missing.jsonl") == []
