"""The ``rayprune`` command line. It owns nothing: parse, validate, hand over, print."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from actors.models import read_model_config

    from .campaign import Campaign
    from .config_load import load_config

    config = load_config(args.config, args.overrides, check_model=read_model_config)
    campaign = Campaign(config, progress=not args.no_progress)
    result = campaign.run()
    print(summary(result.run_dir))
    if campaign.storage.remote:
        print(f"Mirrored to: {campaign.storage.shown}")
    return 0


def summary(run_dir: Path) -> str:
    """The removal path and the held-out figures, as printed at the end of a run."""
    from .report import path_table
    from .rundir import RunDir

    path = RunDir(run_dir).read_path()
    held, ev = path["heldout"], path["evaluations"]
    final_ratio = path["steps"][-1]["ratio"] if path["steps"] else 0.0
    return "\n".join([
        "", "Removal path (calibration perplexity):" if path.get("fitness", "ppl") == "ppl" else
        f"Removal path (calibration fitness exp(KL to dense), {path['fitness']}):", path_table(path), "",
        f"Held-out perplexity: dense {held['dense_ppl']:.3f} -> pruned {held['pruned_ppl']:.3f} "
        f"at ratio {final_ratio:.4f}",
        f"Evaluations: {ev['evaluated']} run, {ev['cached']} from cache, {ev['failed']} failed; "
        f"{path['seconds']:.0f} s",
        f"Run directory: {run_dir}",
    ])


def _report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .storage import local_run

    with local_run(args.run_dir, write_back=True) as run_dir:
        print(write_report(run_dir))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval_model import evaluate_model, format_result, load_target

    if args.tasks:
        from actors.zeroshot import check_tasks

        check_tasks(args.tasks)  # before minutes of model loading
    from .storage import local_run

    settings = dict(corpus=args.corpus, sequences=args.sequences, length=args.length, seed=args.seed,
                    tasks=tuple(args.tasks or ()), batch_size=args.batch_size, limit=args.limit, protocol=args.protocol)
    where = args.on or ("cluster" if os.environ.get("RAY_ADDRESS") else "driver")
    if where == "cluster":  # the weights load on a worker with GPUs, never on the driver
        from .eval_remote import evaluate_on_cluster

        result = evaluate_on_cluster(args.model_or_run, dtype=args.dtype, num_gpus=args.gpus, num_cpus=args.cpus,
                                     **settings)
    else:
        with local_run(args.model_or_run) as spec:  # a run directory behind a URI is pulled first
            target = load_target(args.model_or_run if spec == Path(args.model_or_run) else str(spec), dtype=args.dtype)
        result = evaluate_model(target, **settings)
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def _recover(args: argparse.Namespace) -> int:
    from .recover import recover, recovery_summary
    from .recovery_config import load_recovery
    from .storage import local_run

    from .rundir import RunDir

    with local_run(args.run_dir, write_back=True) as run_dir:  # a run behind a URI is pulled, then mirrored
        rundir = RunDir(Path(run_dir))
        if not Path(run_dir).is_dir():
            raise ValueError(f"{args.run_dir} is not a run directory; give the output of a campaign (e.g. runs/demo)")
        # the run's recovery: section (if any), then the command line's KEY=VALUE
        settings = load_recovery(rundir.read_config().get("recovery"),
                                 args.overrides)
        with rundir:  # one driver per run directory, as for `rayprune run`
            result = recover(run_dir, settings, tasks=tuple(args.tasks or ()), progress=not args.no_progress,
                             fresh=args.fresh)
        print(recovery_summary(result))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from actors.models import read_model_config
    from search_spaces import Arch, Mask, dense_params, param_count, ratio
    from search_spaces.pruning_config import mask_from_pruning_config

    arch = Arch.from_hf_config(read_model_config(args.model))
    mask = Mask()
    if args.pruning_config:
        mask = mask_from_pruning_config(json.loads(Path(args.pruning_config).read_text()), arch)
    figures = {"dense_params": dense_params(arch), "kept_params": param_count(mask, arch), "ratio": ratio(mask, arch)}
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{args.model}: {arch.family}, {arch.num_layers} layers, hidden {arch.hidden_size}, MLP {arch.intermediate_size}, "
          f"{arch.num_heads} heads / {arch.num_kv_heads} KV heads x {arch.head_dim}, vocab {arch.vocab_size}"
          f"{', tied embeddings' if arch.tie_embeddings else ''}")
    print(f"dense parameters: {figures['dense_params']:,}")
    if args.pruning_config:
        print(f"kept parameters:  {figures['kept_params']:,} (ratio {figures['ratio']:.4f}; removed blocks take "
              f"their norm weights with them: {param_count(mask, arch, count_removed_norms=True):,} counting them)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from actors.export import load_pruned

    from .export import export_pruning_config, export_run
    from .storage import local_run, uri_scheme

    if args.pruning_config:
        if args.step is not None or not args.out:
            raise ValueError("with --pruning-config, SOURCE is a model: give --out DIR (and no --step)")
        out = export_pruning_config(args.source, args.pruning_config, args.out, dtype=args.dtype or "float32")
    elif uri_scheme(args.source) is None and not Path(args.source).is_dir():
        raise ValueError(f"{args.source} is not a run directory; to prune a model, add --pruning-config FILE --out DIR")
    else:  # a run directory behind a URI is pulled first; its new model/ is mirrored back
        with local_run(args.source, write_back=args.out is None) as run_dir:
            out = export_run(run_dir, step=args.step, out=args.out, dtype=args.dtype)
    rayprune = json.loads((out / "config.json").read_text())["rayprune"]
    print(f"compact model written to {out}: {rayprune['params']:,} parameters"
          f"{', refitted down_proj in MLP layers ' + ', '.join(rayprune['tuned']) if rayprune.get('tuned') else ''}; "
          f"load it with actors.export.load_pruned({str(out)!r})")
    if args.check:
        load_pruned(out)
        print("loaded back with stock transformers classes: ok")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from actors.models import read_model_config
    from cluster.plan import REFERENCE_MODELS, Hardware, assumptions, format_plans, plan_search, size_replica
    from search_spaces import Arch

    from .config_load import load_config

    from actors.sizing import ReplicaTooLarge

    config = load_config(args.config, args.overrides, check_model=read_model_config)
    model = args.as_model or config.model
    model_config = REFERENCE_MODELS.get(model) or read_model_config(model)
    arch = Arch.from_hf_config(model_config)
    memory = args.gpu_memory_gb or (config.cluster.gpu_memory_gb if config.cluster.gpu_memory_gb != "auto" else 80.0)
    cal, ev = config.data.calibration, config.data.evaluation
    hw = Hardware(tflops=args.tflops, gpu_memory_gb=memory, gpus_per_node=args.gpus_per_node,
                  fp32_tflops=args.fp32_tflops, read_gb_s=args.read_gb_s, reloads=args.reloads,
                  straggler=args.straggler, tiling=args.tiling)
    if (cal.sequences is None and not args.tokens) or ev.sequences is None:
        raise ValueError(f"the {config.data.protocol} protocol leaves the number of "
                         f"{'calibration' if cal.sequences is None and not args.tokens else 'held-out'} windows to its "
                         "cut of the text, known only once it is tokenized; plan with explicit counts, e.g. "
                         "--tokens 65536 (calibration tokens) and data.evaluation.sequences=166 (WikiText-2 test "
                         "in 2048-token windows of Llama-2's tokenizer)")
    tokens = args.tokens or cal.sequences * cal.length
    workload = dict(dtype=config.dtype, window_length=cal.length, eval_tokens=ev.sequences * ev.length,
                    eval_length=ev.length)
    try:
        replica = size_replica(model_config, config, memory, max_gpus=args.gpus_per_node)
        k, memory_lines = replica.gpus, replica.describe()
    except ReplicaTooLarge as exc:
        k, memory_lines = 0, f"replica: does not fit one node: {exc}"
    plans, notes = plan_search(arch, model, config.search, tokens, args.gpus, hw, replica_gpus=k, **workload)
    print(assumptions(hw, config.dtype, tokens, cal.length, ev.sequences * ev.length, ev.length))
    print()
    print(format_plans(plans))
    print()
    print(memory_lines)
    print(f"  (working memory for search.batch_size {config.search.batch_size} x "
          f"{max(cal.length, config.data.evaluation.length)} tokens, the longer window; dtype {config.dtype})")
    for note in notes:
        print(f"note: {note}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from actors.models import read_model_config

    from .config_load import load_config
    from .tune import run_tune

    config = load_config(args.config, args.overrides, check_model=read_model_config)
    run_tune(config, trials=args.trials, seed=args.seed)
    print((Path(config.output) / "tune_report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PROTOCOLS
    from .config_checks import DTYPES

    parser = argparse.ArgumentParser(prog="rayprune", description="Structured pruning of LLMs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a pruning campaign",
                         description="Run a campaign from a YAML config; rerunning resumes from the run directory's cache.")
    run.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys, e.g. search.target_ratio=0.2")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    run.set_defaults(func=_run)

    report = sub.add_parser("report", help="rewrite report.md, curve.png and mask.png of a run directory")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    ev = sub.add_parser("eval", help="held-out perplexity (and zero-shot accuracy) of a run, an export or a model",
                        description="Evaluate a run directory (its model/ export, else its final mask applied in "
                                    "memory), a compact export, or a dense model (preset, directory, hub id). "
                                    "Held-out settings default to the run's data.evaluation.")
    ev.add_argument("model_or_run", metavar="MODEL_OR_RUN")
    ev.add_argument("--corpus", help="held-out corpus (default: the run's data.corpus, else wikipedia); its test split is used")
    ev.add_argument("--protocol", choices=PROTOCOLS,
                    help="cut the held-out windows as this paper does, from its corpus (WikiText-2 test) at its "
                         "length (default: the run's data.protocol, else rayprune)")
    ev.add_argument("--sequences", type=int, help="held-out windows (default: the run's, else 16)")
    ev.add_argument("--length", type=int, help="tokens per window (default: the run's, else 256)")
    ev.add_argument("--seed", type=int, help="window seed (default: the run's, else 1234)")
    ev.add_argument("--batch-size", type=int, default=4, help="held-out windows (and zero-shot requests) per forward pass")
    ev.add_argument("--dtype", choices=DTYPES, help="evaluate in this dtype (default: the run's, an export's own, "
                                                    "float32 for a dense model; auto: fp32 on a CPU)")
    ev.add_argument("--tasks", nargs="+", metavar="FILE_OR_NAME",
                    help="zero-shot lm_eval tasks: local task YAML files, registered names, or a paper's set "
                         "(blockpruner, multipruner: piqa winogrande hellaswag arc_easy arc_challenge; sprint: "
                         "boolq instead of winogrande), which also prints the papers' average (needs rayprune[eval])")
    ev.add_argument("--limit", type=int, help="at most this many items per zero-shot task")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.add_argument("--on", choices=["driver", "cluster"],
                    help="where the model loads: cluster (a Ray task on a worker with --gpus GPUs; the default with "
                         "RAY_ADDRESS set) or driver (this process; the default otherwise)")
    ev.add_argument("--gpus", type=float, help="GPUs of the evaluation task on the cluster (default: 1 if the cluster "
                                               "has GPUs, else 0; more spreads the model over them)")
    ev.add_argument("--cpus", type=float, default=1.0, help="CPUs (torch threads) of the evaluation task on the cluster")
    ev.set_defaults(func=_eval)

    export = sub.add_parser("export", help="write a compact model from a run, or from a model and a pruning_config.json",
                            description="RUN [--step K]: the model after step K of the run's path (default: the last; "
                                        "0: dense), SPRINT's refitted weights included, to RUN/model (or "
                                        "RUN/model-step-K). MODEL --pruning-config FILE --out DIR: a MultiPruner "
                                        "pruning_config.json applied to its model.")
    export.add_argument("source", metavar="RUN_OR_MODEL")
    export.add_argument("--pruning-config", metavar="FILE", help="a MultiPruner pruning_config.json (SOURCE is a model)")
    export.add_argument("--step", type=int, help="a step of the run's path (default: the last)")
    export.add_argument("--out", help="output directory")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: a run's search dtype (path.json), float32 for --pruning-config")
    export.add_argument("--check", action="store_true", help="load the written model back")
    export.set_defaults(func=_export)

    plan = sub.add_parser("plan", help="predict a campaign's wall time on 1..N GPUs before it starts",
                          description="The scaling model of cluster/plan.py applied to a config: steps, evaluations "
                                      "and wall time with the naive loop and with the engine; and the replica: "
                                      "GPUs per replica and its memory (weights per GPU from accelerate's device map "
                                      "on the meta device, the engine's working memory) in the config's dtype "
                                      "(override it, e.g. dtype=float32; auto plans 16-bit GPU weights). Steps are "
                                      "given as a middle estimate and the range a greedy path can take; every "
                                      "assumption is printed above the table.")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    plan.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    plan.add_argument("--tflops", type=float, default=35.0, help="effective 16-bit TFLOPS of one GPU (default 35)")
    plan.add_argument("--fp32-tflops", type=float,
                      help="effective TFLOPS in float32 (default: half of --tflops, TF32; on CPUs: measured)")
    plan.add_argument("--gpu-memory-gb", type=float,
                      help="memory of one GPU in GB (default: cluster.gpu_memory_gb when a number, else 80)")
    plan.add_argument("--gpus-per-node", type=int, default=8,
                      help="GPUs per node: a replica spans at most these, and replicas fill nodes (default 8)")
    plan.add_argument("--read-gb-s", type=float, default=1.0,
                      help="shared storage bandwidth per replica in GB/s: loading, restarts, export (default 1)")
    plan.add_argument("--reloads", type=float, default=1.0,
                      help="expected replica restarts during the campaign, each a new start and load (default 1)")
    plan.add_argument("--straggler", type=float, default=0.2,
                      help="a step waits this fraction of its longest tile more (default 0.2)")
    plan.add_argument("--tiling", choices=["scorer", "shards", "chunks"], default="scorer",
                      help="how a step is cut into tiles: as the scorer does (default), windows first, or chunks "
                           "only (before issue #12)")
    plan.add_argument("--tokens", type=int, help="calibration tokens (default: sequences x length of the config)")
    plan.add_argument("--as-model", help="plan for a reference architecture instead (llama2-7b, llama2-13b, llama2-70b)")
    plan.set_defaults(func=_plan)

    tune = sub.add_parser("tune", help="Ray Tune + Optuna over a greedy campaign's order, split, groups, calibration",
                          description="Runs --trials greedy (MultiPruner-style) campaigns to the config's target, "
                                      "each with its own stage order, budget split, MLP group size and calibration "
                                      "size, one at a time on one evaluator pool and one cache; writes "
                                      "tune_results.csv, tune_report.md and best.yaml to the config's output.")
    tune.add_argument("config")
    tune.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    tune.add_argument("--trials", type=int, default=8, help="campaigns to run (default 8)")
    tune.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler")
    tune.set_defaults(func=_tune)

    recover = sub.add_parser("recover", help="LoRA fine-tuning of a run's compact model on Ray Train (recovery)",
                             description="Fine-tune RUN/model with LoRA (peft) on Ray Train workers, merge the "
                                         "adapter into RUN/recovery/model and measure held-out perplexity of dense, "
                                         "pruned and recovered. Defaults: MultiPruner's recipe (r 16, alpha 32, "
                                         "q/k/v/o/gate/up/down, Alpaca, batch 8 x 4, lr 1e-4, 2 epochs); settings "
                                         "come from the run's recovery: section, then KEY=VALUE. Rerunning the same "
                                         "command resumes from the last checkpoint.")
    recover.add_argument("run_dir", metavar="RUN")
    recover.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                         help="recovery settings, e.g. data=run max_steps=100 workers=2 (docs: README)")
    recover.add_argument("--tasks", nargs="+", metavar="FILE_OR_NAME",
                         help="zero-shot tasks to measure before and after (as rayprune eval --tasks)")
    recover.add_argument("--fresh", action="store_true",
                         help="start over: move an earlier RUN/recovery to RUN/history/ first")
    recover.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    recover.set_defaults(func=_recover)

    inspect = sub.add_parser("inspect", help="architecture and parameter counts from config.json alone")
    inspect.add_argument("model", help="a preset, a local Hugging Face directory, or a hub id")
    inspect.add_argument("--pruning-config", help="a MultiPruner pruning_config.json to count")
    inspect.add_argument("--json", action="store_true", help='print {"dense_params", "kept_params", "ratio"}')
    inspect.set_defaults(func=_inspect)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; ``KEY=VALUE`` overrides may also follow options (``run CFG --no-progress a.b=1``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from cluster.placement import PlacementError

    from .campaign import RunDirectoryBusy
    from .scorer import EveryMaskFailed

    try:
        return args.func(args)
    except (ValueError, OSError, RunDirectoryBusy, PlacementError, EveryMaskFailed) as exc:
        if args.verbose:
            raise
        print(f"rayprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
