"""First thing to run on a new cluster: does ``rayprune run`` work on its GPUs, end to end?

    make gpu-check                                                 # a tiny random Llama, 1 GPU per replica
    ray job submit --working-dir . -- python cluster/gpu_check.py --model /shared/Llama-2-7b-hf --gpus-per-replica 2
    python cluster/gpu_check.py --allow-cpu                        # no GPU here: the same path on CPUs

It prints what it sees (the cluster's resources, a replica's torch/CUDA view), then runs a real short
campaign through the code of ``rayprune run`` (``orchestrator.campaign.Campaign``): the L1 reorder on
(the default), the configured ``--dtype`` (default ``auto``), ``cluster.gpus_per_actor`` from
``--gpus-per-replica``, and a MultiPruner search of a few steps that narrows MLPs and attention head
units (so the reorder decides what is kept) and then removes blocks. The model is a tiny random Llama
with GQA written to a temporary directory, or ``--model``. Then it checks, one PASS/FAIL line each:
the run finished, its path is not empty, every perplexity is finite, the replica computed on CUDA
(when GPUs were asked for), in the resolved dtype, and the compact export loads (``rayprune eval``'s
code, ``orchestrator.eval_model``) with the held-out perplexity the run recorded. It exits 1 if any
check fails, 2 if it cannot start (no GPU visible and no ``--allow-cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

#: A tiny Llama with GQA (4 query heads sharing 2 KV heads) and MLP/attention biases: seconds to prune.
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
            attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6)
#: Held-out perplexity of the export against the run's: exact in fp32 on a CPU; the export is
#: evaluated on the driver's CPU, so a GPU run (TF32 or half precision kernels) gets some slack.
TOLERANCE = {"cpu": 1e-5, "float32": 1e-2, "bfloat16": 3e-2, "float16": 3e-2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a preset, local directory or hub id (default: a tiny random Llama)")
    parser.add_argument("--corpus", default=None, help="default: generated text for the tiny model, else wikipedia")
    parser.add_argument("--gpus-per-replica", type=float, default=1, help="cluster.gpus_per_actor (default 1)")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (default auto)")
    parser.add_argument("--length", type=int, default=64, help="tokens per calibration / held-out window")
    parser.add_argument("--steps", type=int, default=6, help="greedy steps of the search (search.max_steps)")
    parser.add_argument("--output", default=None, help="keep the run directory here (default: a temporary one)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on CPUs (0 GPUs per replica) when the cluster has no GPU for a replica")
    return parser.parse_args(argv)


def tiny_model(directory: Path) -> tuple[str, str]:
    """A tiny random Llama (safetensors + a character-level tokenizer) and a text corpus under ``directory``."""
    import random

    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():  # random init leaves biases at zero and norms at one: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory / "model")
    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>").save_pretrained(
        directory / "model")
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do"]
    lines = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(12)) + "."
             for _ in range(500)]
    (directory / "corpus.txt").write_text("\n".join(lines) + "\n")
    return str(directory / "model"), str(directory / "corpus.txt")


def campaign_config(args: argparse.Namespace, model: str, corpus: str, gpus: float, output: Path):
    """The config of the check's campaign, validated as ``rayprune run`` validates its own."""
    from orchestrator.config_load import load_config

    windows = f"{{sequences: 4, length: {args.length}, seed: 0}}"
    overrides = {
        "name": "gpu-check", "model": model, "data.corpus": corpus, "data.calibration": windows,
        "data.evaluation": f"{{sequences: 2, length: {args.length}, seed: 1}}",
        # widths first (the L1 reorder decides which channels and head units stay), then whole blocks
        "search.method": "multipruner", "search.order": "mlp,heads,blocks", "search.split": "30:20:50",
        "search.target_ratio": 0.3, "search.max_steps": args.steps, "search.head_group": 1, "search.batch_size": 2,
        "cluster.actors": 1, "cluster.cpus_per_actor": 1, "cluster.gpus_per_actor": gpus,
        "dtype": args.dtype, "output": str(output),
    }
    if args.model is None:
        overrides["search.mlp_group"] = 16  # a third of the tiny MLP
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@contextlib.contextmanager
def replica_infos(seen: list[dict[str, Any]]) -> Iterator[None]:
    """While inside, every evaluator pool the campaign starts reports its replicas' ``info()`` into
    ``seen`` (device, dtype, fingerprint) before the search starts; the pool itself is unchanged."""
    import ray

    import cluster.session as session

    original = session.evaluator_pool

    @contextlib.contextmanager
    def observed(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with original(*args, **kwargs) as pool:
            seen.extend(ray.get([actor.info.remote() for actor in pool.actors]))
            yield pool

    session.evaluator_pool = observed
    try:
        yield
    finally:
        session.evaluator_pool = original


class Checks:
    """PASS/FAIL lines, printed as they come."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}: {name}" + (f" ({detail})" if detail else ""), flush=True)
        if not ok:
            self.failed.append(name)
        return ok


def replica_view(gpus: float) -> dict[str, Any]:
    """What a task holding ``gpus`` GPUs sees: torch, CUDA, the devices and what ``dtype: auto`` means there."""
    import ray

    @ray.remote(num_gpus=gpus, num_cpus=1)
    def devices() -> dict:
        import torch

        from actors.models import resolve_dtype

        cuda = torch.cuda.is_available()
        return {"cuda": cuda, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "torch": torch.__version__, "cuda_version": torch.version.cuda,
                "auto_dtype": str(resolve_dtype("auto", "cuda" if cuda else "cpu")).removeprefix("torch.")}

    return ray.get(devices.remote())


def run_checks(args: argparse.Namespace, gpus: float, view: dict[str, Any], work: Path) -> list[str]:
    """Run the campaign in ``work`` and check it; returns the names of the failed checks."""
    from orchestrator.campaign import Campaign
    from orchestrator.eval_model import evaluate_model, load_target
    from orchestrator.rundir import RunDir

    check = Checks()
    model, corpus = tiny_model(work) if args.model is None else (args.model, args.corpus or "wikipedia")
    if args.model is None and args.corpus:
        corpus = args.corpus
    output = Path(args.output) if args.output else work / "run"
    config = campaign_config(args, model, corpus, gpus, output)
    infos: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    try:
        with replica_infos(infos):
            result = Campaign(config, progress=False).run()
    except Exception as exc:  # the campaign itself is the first check
        check("the campaign finished", False, f"{type(exc).__name__}: {exc}")
        return check.failed
    check("the campaign finished", True, f"{time.perf_counter() - t0:.1f} s, {result.counters.evaluated} evaluations, "
          f"{result.counters.failed} failed")
    for info in infos:
        print("replica:", json.dumps(info))
    path = RunDir(result.run_dir).read_path()
    steps = path["steps"]
    check("the removal path is not empty", bool(steps),
          ", ".join(f"{s['kind']} {s['layer']}" + (f" -> {s['width']}" if "width" in s else "") for s in steps))
    check("the path narrows widths (the reorder decides what stays)",
          any(s["kind"] in ("mlp_width", "attn_width") for s in steps))
    ppls = {"dense": path["dense_ppl"], **{f"step {s['step']}": s["ppl"] for s in steps},
            **{f"held-out {k}": v for k, v in path["heldout"].items()}}
    check("every perplexity is finite", all(isinstance(v, (int, float)) and math.isfinite(v) for v in ppls.values()),
          ", ".join(f"{k} {v:.3f}" for k, v in ppls.items()))
    check("no evaluation failed", result.counters.failed == 0, f"{result.counters.failed} failed")
    devices = sorted({i.get("device", "?") for i in infos})
    if gpus > 0:
        check("the replica computed on CUDA", bool(infos) and all(d.startswith("cuda") for d in devices), ", ".join(devices))
    else:
        check("the replica computed on the CPU (--allow-cpu)", devices == ["cpu"], ", ".join(devices))
    expected = args.dtype if args.dtype != "auto" else (view["auto_dtype"] if gpus > 0 else "float32")
    dtypes = sorted({i.get("dtype", "?") for i in infos})
    exported = json.loads((result.run_dir / "model" / "config.json").read_text()).get("dtype")
    check(f"the dtype is the resolved one ({args.dtype} -> {expected})",
          dtypes == [expected] and path.get("dtype") == expected and exported == expected,
          f"replicas {', '.join(dtypes)}, recorded {path.get('dtype')}, export {exported}")
    try:
        target = load_target(str(result.run_dir))
        held = evaluate_model(target, batch_size=2)
    except Exception as exc:
        check("the export loads and evaluates", False, f"{type(exc).__name__}: {exc}")
        return check.failed
    recorded = (held.get("recorded_heldout") or {}).get("pruned_ppl")
    tolerance = TOLERANCE["cpu" if gpus == 0 and expected == "float32" else expected]
    ok = recorded is not None and math.isclose(held["heldout"]["ppl"], recorded, rel_tol=tolerance)
    check("the export's held-out perplexity is the run's", ok,
          f"{target.kind}, {held['params']:,} parameters: {held['heldout']['ppl']:.4f} vs recorded "
          f"{recorded if recorded is None else format(recorded, '.4f')}, tolerance {tolerance:g}")
    if args.output:
        print(f"run directory: {result.run_dir}")
    return check.failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    import ray

    from cluster.session import connect

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = connect(num_cpus=max(2, os.cpu_count() or 2))
    try:
        resources = ray.cluster_resources()
        print("cluster resources:", json.dumps(resources), flush=True)
        gpus = args.gpus_per_replica
        if resources.get("GPU", 0) < max(gpus, 1e-9):
            if not args.allow_cpu:
                print(f"FAIL: no GPU visible to Ray (cluster resources: {resources.get('GPU', 0):g} GPUs; a replica "
                      f"needs {gpus:g}). Run this on a GPU node or cluster, or pass --allow-cpu to check the same "
                      f"path on CPUs.", flush=True)
                return 2
            print(f"no GPU for a replica of {gpus:g} GPUs: --allow-cpu, so replicas run on CPUs (0 GPUs)")
            gpus = 0
        view = replica_view(gpus)
        print("a replica's view:", json.dumps(view), flush=True)
        with tempfile.TemporaryDirectory(prefix="rayprune-gpu-check-") as work:
            failed = run_checks(args, gpus, view, Path(work))
        print(f"gpu check: {'all checks passed' if not failed else f'{len(failed)} FAILED: ' + '; '.join(failed)}")
        return 1 if failed else 0
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
