"""Reproduce the published Llama-2-7B rows of BlockPruner, MultiPruner and SPRINT with rayprune.

    python bench/reproduce/llama2_7b.py --model meta-llama/Llama-2-7b-hf --out runs/reproduce
    python bench/reproduce/llama2_7b.py --only blockpruner,multipruner-published --dry-run
    RAY_ADDRESS=... python bench/reproduce/llama2_7b.py --out /shared/runs/reproduce --gpus-per-actor 1 --actors 8

Rows (bench/reproduce/README.md): the dense model; BlockPruner at 21.99% (data.protocol blockpruner,
bf16); MultiPruner's published 22% pruning_config.json applied (rayprune export, then eval);
MultiPruner at 22% by rayprune's own search (data.protocol multipruner, the recipe's defaults);
SPRINT at a target speedup (data.protocol sprint). Each is rayprune's own commands (``rayprune run``
with a config written to OUT/<row>/config.yaml, ``rayprune export``, ``rayprune eval --protocol
<paper> --tasks <paper's set>``), run one after another in subprocesses; each row's WikiText-2
perplexity at 2048 tokens, 5-task zero-shot average, ratio, parameters and step times are printed
next to the published figures and written to OUT/results.json and OUT/results.md. A rerun skips
every finished step. It needs a GPU here or a Ray cluster (RAY_ADDRESS); ``--allow-cpu`` runs the
same path on CPUs, for tiny models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.reproduce import runner, table  # noqa: E402
from bench.reproduce.plan import (DEFAULT_MODEL, PUBLISHED_CONFIG, ROWS, RUN_ORDER, TABLE_ORDER, Options,  # noqa: E402
                                  Step, build_plan, describe)
from bench.reproduce.published import LLAMA2_7B_SHAPE, SPRINT_SPEEDUP  # noqa: E402


class BadInput(ValueError):
    """Input the reproduction refuses before any work; the message lists every problem and its fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local directory (default {DEFAULT_MODEL})")
    parser.add_argument("--out", default="runs/reproduce", help="results and run directories (default runs/reproduce; "
                                                              "on a cluster: a path every node mounts)")
    parser.add_argument("--only", default=",".join(TABLE_ORDER),
                        help=f"comma-separated rows (default all: {','.join(TABLE_ORDER)})")
    parser.add_argument("--gpus-per-actor", default="1", help="GPUs per evaluator replica and per eval task "
                                                              "(default 1; auto: the fewest that hold the model)")
    parser.add_argument("--actors", default="auto", help="evaluator replicas per campaign (default auto: as many as "
                                                        "the free GPUs hold)")
    parser.add_argument("--tasks", action=argparse.BooleanOptionalAction, default=True,
                        help="zero-shot tasks of each paper's set through lm-eval (default on; --no-tasks: perplexity only)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="one dtype for every row (default: each paper code's own, see README)")
    parser.add_argument("--sprint-speedup", type=float, default=SPRINT_SPEEDUP,
                        help=f"SPRINT's target speedup (default {SPRINT_SPEEDUP}: SPRINT's README example; "
                             f"SPEC gives no Llama-2-7B figure)")
    parser.add_argument("--pruning-config", default=str(PUBLISHED_CONFIG),
                        help="the pruning_config.json of row multipruner-published (default: MultiPruner's "
                             "published Llama-2-7B 22%% file, bench/reproduce/data/)")
    parser.add_argument("--alpaca", help="a local copy of Alpaca (.jsonl/.json/.parquet with a text column) for "
                                         "the blockpruner and multipruner protocols (default: the hub's)")
    parser.add_argument("--wikitext-train", help="a local WikiText-2 train file for the sprint protocol (default: hub)")
    parser.add_argument("--wikitext-test", help="a local WikiText-2 test file for every held-out figure (default: hub)")
    parser.add_argument("--eval-length", type=int, help="held-out windows of this many tokens instead of 2048 "
                                                        "(tiny models; the table flags it)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="[ROW:]KEY=VALUE",
                        help="override a campaign config key, in every campaign or in ROW's only "
                             "(e.g. --set search.batch_size=2, --set sprint:search.sprint.top_k=3)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPUs (no GPU, no cluster): tiny models only")
    parser.add_argument("--dry-run", action="store_true", help="print the configs and commands; run nothing")
    return parser.parse_args(argv)


def _auto_or(value: str, kind: Callable[[str], float | int], flag: str) -> float | int | str:
    if value == "auto":
        return value
    try:
        number = kind(value)
    except ValueError:
        raise BadInput(f"{flag} {value!r}: give a number or auto") from None
    if number < 0 or (flag == "--actors" and number < 1):
        raise BadInput(f"{flag} {value!r}: must be {'at least 1' if flag == '--actors' else 'positive'}, or auto")
    return int(number) if float(number).is_integer() else number


def options_from(args: argparse.Namespace) -> Options:
    out = str(args.out)
    if "://" in out:
        raise BadInput(f"--out {out}: give a local or mounted path (every step reads it); a URI is not supported here")
    gpus = 0 if args.allow_cpu else _auto_or(args.gpus_per_actor, float, "--gpus-per-actor")
    return Options(model=args.model, out=Path(out).expanduser().resolve(),
                   only=tuple(r.strip() for r in args.only.split(",") if r.strip()),
                   gpus_per_actor=gpus, actors=_auto_or(args.actors, int, "--actors"), tasks=args.tasks,
                   dtype=args.dtype, sprint_speedup=args.sprint_speedup,
                   pruning_config=Path(args.pruning_config).expanduser().resolve(),
                   alpaca=_absolute(args.alpaca), wikitext_train=_absolute(args.wikitext_train),
                   wikitext_test=_absolute(args.wikitext_test), eval_length=args.eval_length,
                   sets=tuple(args.sets), on_cluster=not args.allow_cpu)


def _absolute(path: str | None) -> str | None:
    return None if path is None or path.startswith("hf:") else str(Path(path).expanduser().resolve())


def _looks_local(model: str) -> bool:
    """A path rather than a hub id (``org/name``) or a preset."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).expanduser().exists()


def local_gpus() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check(options: Options, steps: list[Step], *, dry_run: bool, allow_cpu: bool) -> list[str]:
    """Every problem with the input, one line each, before anything runs; notes go to stdout."""
    from actors.models import read_model_config

    problems = []
    if options.sprint_speedup <= 1:
        problems.append(f"--sprint-speedup {options.sprint_speedup}: a speedup is above 1, e.g. 1.41")
    if options.eval_length is not None and options.eval_length < 2:
        problems.append(f"--eval-length {options.eval_length}: give at least 2 tokens (the papers use 2048)")
    for flag, path in (("--alpaca", options.alpaca), ("--wikitext-train", options.wikitext_train),
                       ("--wikitext-test", options.wikitext_test)):
        if path and not path.startswith("hf:") and not Path(path).is_file():
            problems.append(f"{flag} {path}: no such file; give a local copy of the dataset, or leave it out for the hub's")
    published = "multipruner-published" in options.only
    if published and not options.pruning_config.is_file():
        problems.append(f"--pruning-config {options.pruning_config}: no such file")
    local = _looks_local(options.model)
    model_config = None
    if local and not Path(options.model).expanduser().is_dir():
        problems.append(f"--model {options.model}: no such directory; give a local Hugging Face model directory or "
                        f"a hub id such as {DEFAULT_MODEL}")
    elif local or not dry_run:  # a dry run asks no hub
        try:
            model_config = read_model_config(options.model)
        except ValueError as exc:
            problems.append(f"--model {options.model}: {exc}")
    problems += _config_problems(steps, check_model=read_model_config if model_config is not None else None)
    if model_config is not None:
        problems += _model_problems(options, model_config)
    if not dry_run:
        if options.tasks and _missing("lm_eval"):
            problems.append("zero-shot tasks need lm-evaluation-harness on this machine: pip install -r "
                            "requirements-eval.txt (or 'rayprune[eval]'), or pass --no-tasks for perplexity only")
        if not allow_cpu and not os.environ.get("RAY_ADDRESS") and local_gpus() == 0:
            problems.append("no GPU here and no RAY_ADDRESS: run on a machine with a GPU, or set RAY_ADDRESS to a Ray "
                            "cluster with GPUs (see README, 'On a Ray cluster'); --allow-cpu runs on CPUs, for tiny "
                            "models only")
    return problems


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def _config_problems(steps: list[Step], check_model: Callable[[str], dict] | None) -> list[str]:
    """Every campaign config as it will be written, through ``rayprune run``'s own checks."""
    from orchestrator.config import ConfigError
    from orchestrator.config_load import load_config

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in steps:
            if step.config is None:
                continue
            path = Path(tmp) / f"{step.row}.yaml"
            path.write_text(step.config_text(), encoding="utf-8")
            try:
                load_config(path, check_model=check_model)
            except ConfigError as exc:
                problems += [f"row {step.row}: {p}" for p in exc.problems]
    return problems


def _model_problems(options: Options, model_config: dict) -> list[str]:
    """The published pruning config against the model; a note when the model is not Llama-2-7B."""
    from search_spaces import Arch
    from search_spaces.pruning_config import mask_from_pruning_config

    problems = []
    if "multipruner-published" in options.only and options.pruning_config.is_file():
        try:
            mask_from_pruning_config(json.loads(options.pruning_config.read_text()), Arch.from_hf_config(model_config))
        except (ValueError, json.JSONDecodeError) as exc:
            problems.append(f"--pruning-config {options.pruning_config} does not fit {options.model}: {exc}")
    if any(model_config.get(k) != v for k, v in LLAMA2_7B_SHAPE.items()):
        print(f"note: {options.model} is not Llama-2-7B's architecture; the published figures are Llama-2-7B's "
              f"and are shown for reference only")
    return problems


def dry_run(options: Options, steps: list[Step], state: dict) -> None:
    print(f"rayprune = {' '.join(runner.CLI)}   (run from any directory; paths are absolute)")
    for name in RUN_ORDER:
        if name not in options.only:
            continue
        print(f"\n{describe(ROWS[name], options)}")
        for step in (s for s in steps if s.row == name):
            if step.config is not None:
                print(f"  write {step.config_path}:")
                print("\n".join(f"    {line}" for line in step.config_text().splitlines()))
            done = " (done in an earlier run: would be skipped)" if runner.is_done(step, state) else ""
            print(f"  $ {runner.shown(step)}{done}")
    print(f"\nresults: {options.out / runner.STATE}, {options.out / 'results.md'}")


def write_results(options: Options, state: dict) -> str:
    """OUT/results.json (the steps, the settings, the table) and OUT/results.md; returns the table."""
    rows = table.table_rows(state, options)
    text = table.markdown(rows, options)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}
    runner.write_json(options.out / runner.STATE, {**state, "settings": settings, "table": rows})
    commands = [entry["command"] for entry in state["steps"].values() if entry.get("command")]
    (options.out / "results.md").write_text(
        f"# rayprune against the published Llama-2-7B rows\n\nModel: {options.model}\n\n{text}\n"
        "Commands (`rayprune` = `python -m orchestrator.cli`):\n\n```bash\n" + "\n".join(commands) + "\n```\n",
        encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = options_from(args)
        steps = build_plan(options)
        state = runner.read_state(options.out)
        problems = check(options, steps, dry_run=args.dry_run, allow_cpu=args.allow_cpu)
        if problems:
            raise BadInput("\n".join(["cannot start the reproduction:", *(f"  - {p}" for p in problems)]))
    except ValueError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(options, steps, state)
        return 0
    options.out.mkdir(parents=True, exist_ok=True)
    failed = runner.execute_plan(steps, state, options.out, after_step=lambda: write_results(options, state))
    print("\n" + write_results(options, state))
    print(f"written: {options.out / runner.STATE}, {options.out / 'results.md'}")
    if failed:
        print(f"failed steps: {', '.join(failed)} (their logs are under {options.out}); rerun to retry them",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
