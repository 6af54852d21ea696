"""Benchmark: one full BlockPruner step on SmolLM2-135M, naive loops vs the engine, side by side.

    make bench            # or: .venv/bin/python bench/engine_step.py [--sequences 4 --length 128]

One process, one worker, the same calibration windows for every method, measured in one run:
  * naive-stock: the papers' loop: the stock HF forward with ``labels=`` per candidate (blocks
    swapped out in place), one full forward per candidate;
  * naive-lean: our lean forward, still one full forward per candidate;
  * engine-1stream: prefix reuse (calibration batch outer, candidates inner, suffixes only), one
    candidate at a time on all threads;
  * engine: the same with one concurrent candidate stream per thread (the CPU default);
  * naive-streams: no prefix reuse, but candidates run concurrently like the engine's (this row
    separates what prefix reuse buys from what concurrent streams buy).
Two steps are measured: a block step (every block's removal) and a MultiPruner width step (every
layer's MLP narrowed by one channel group), both from the dense, L1-reordered model.
All methods must choose the same candidate; the ratios go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from actors.models import load_model, load_tokenizer, resolve_model
from actors.reference import stock_masked, stock_nll
from actors.permutation import apply_permutation_, checkpoint_permutation
from orchestrator.data.corpus import load_documents
from orchestrator.data.windows import token_windows
from results import write_section
from search_spaces import Arch, Block, Mask

MARKERS = {"blocks": "<!-- engine_step -->", "width": "<!-- engine_width_step -->"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mlp-group", type=int, default=256, help="channels one width candidate removes")
    parser.add_argument("--skip-stock", action="store_true", help="skip the slowest (stock) loop")
    parser.add_argument("--steps", nargs="+", choices=sorted(MARKERS), default=sorted(MARKERS),
                        help="which steps to measure (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_model(args.model)
    model = load_model(path)
    arch = Arch.from_hf_config(model.config.to_dict())
    apply_permutation_(model, arch, checkpoint_permutation(path))  # as every evaluator: widths keep the most important
    docs = load_documents("wikipedia", "train")
    windows = torch.as_tensor(token_windows(load_tokenizer(path), docs, args.sequences, args.length, seed=0))
    print(f"windows {tuple(windows.shape)}, {args.threads} threads")

    blocks = [(str(b), Mask().remove(b)) for b in map(Block.from_index, range(arch.num_blocks))]
    width = arch.intermediate_size - args.mlp_group
    widths = [(f"mlp{l}->{width}", Mask().with_mlp_width(l, width)) for l in range(arch.num_layers)]
    for kind, candidates, title in (
        ("blocks", blocks, "One full BlockPruner step (every block's removal, dense base)"),
        ("width", widths, f"One full MultiPruner width step (every layer's MLP {arch.intermediate_size} -> "
                          f"{width} channels, dense base)"),
    ):
        if kind not in args.steps:
            continue
        timings, choice = run_step(args, model, arch, windows, candidates)
        write_results(args, kind, title, len(candidates), timings, choice)


def run_step(args, model, arch: Arch, windows: torch.Tensor, candidates: list[tuple[str, Mask]]):
    """Time every method on the same candidates; all must choose the same one."""
    engine = Engine(LeanDecoder(model, arch), batch_size=args.batch_size)
    streamed = Engine(LeanDecoder(model, arch), batch_size=args.batch_size, streams=args.threads)
    names, masks = zip(*candidates)
    timings: dict[str, float] = {}
    choices: dict[str, tuple[str, float]] = {}

    def record(method: str, nlls: list[tuple[float, int]], seconds: float) -> None:
        ppls = [math.exp(n / t) for n, t in nlls]
        best = min(range(len(ppls)), key=lambda i: (ppls[i], i))
        timings[method], choices[method] = seconds, (names[best], ppls[best])
        print(f"{method:14s} {seconds:8.1f} s   best {names[best]} ppl {ppls[best]:.4f}")

    def timed(method: str, run) -> None:
        t0 = time.perf_counter()
        nlls = run()
        record(method, nlls, time.perf_counter() - t0)

    for eng in (streamed, engine):
        eng.score_masks(windows[: args.batch_size], masks[:2], base=Mask())  # warm-up (allocator, rope)
    as_pairs = lambda scores: [(s.nll_sum, s.tokens) for s in scores]  # noqa: E731
    timed("engine", lambda: as_pairs(streamed.score_masks(windows, masks, base=Mask())))
    timed("engine-1stream", lambda: as_pairs(engine.score_masks(windows, masks, base=Mask())))
    timed("naive-lean", lambda: as_pairs(engine.score_masks_naive(windows, masks)))
    timed("naive-streams", lambda: as_pairs(streamed.score_masks(windows, masks, base=None)))  # no prefix reuse
    if not args.skip_stock:
        def stock():
            out = []
            for mask in masks:
                with stock_masked(model, mask, arch):
                    out.append(stock_nll(model, windows, args.batch_size))
            return out

        timed("naive-stock", stock)
    if len({c[0] for c in choices.values()}) != 1:
        raise SystemExit(f"methods disagree on the best candidate: {choices}")
    return timings, next(iter(choices.values()))


def write_results(args, kind: str, title: str, n: int, timings: dict[str, float], choice: tuple[str, float]) -> None:
    reference = "naive-stock" if "naive-stock" in timings else "naive-lean"
    rows = [f"| {name} | {sec:.1f} | {timings[reference] / sec:.2f}x | {timings['naive-lean'] / sec:.2f}x |"
            for name, sec in timings.items()]
    write_section(MARKERS[kind], [
        f"## {title}",
        "",
        f"`bench/engine_step.py` on {platform.machine()} with {args.threads} threads, {time.strftime('%Y-%m-%d')}: "
        f"{args.model} ({n} candidates), calibration {args.sequences} x {args.length} tokens of the wikipedia "
        f"train split, batch {args.batch_size}, fp32, one worker, one run. The naive loops run one candidate at "
        f"a time on {args.threads} intra-op threads; `engine` runs {args.threads} candidate suffixes concurrently "
        f"on one thread each.",
        "",
        f"| method | seconds | speedup vs {reference} | speedup vs naive-lean |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"All methods chose **{choice[0]}** (calibration ppl {choice[1]:.4f}).",
    ])


if __name__ == "__main__":
    main()
