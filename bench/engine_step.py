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
All three must choose the same block; the ratios go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from actors.corpus import load_documents
from actors.engine import Engine
from actors.forward import LeanDecoder
from actors.models import load_model, load_tokenizer, resolve_model
from actors.reference import stock_masked, stock_nll
from actors.windows import token_windows
from search_spaces import Arch, Block, Mask

RESULTS = Path(__file__).with_name("RESULTS.md")
MARKER = "<!-- engine_step -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-stock", action="store_true", help="skip the slowest (stock) loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_model(args.model)
    model = load_model(path)
    arch = Arch.from_hf_config(model.config.to_dict())
    docs = load_documents("wikipedia", "train")
    windows = torch.as_tensor(token_windows(load_tokenizer(path), docs, args.sequences, args.length, seed=0))
    engine = Engine(LeanDecoder(model, arch), batch_size=args.batch_size)
    streamed = Engine(LeanDecoder(model, arch), batch_size=args.batch_size, streams=args.threads)
    blocks = [Block.from_index(i) for i in range(arch.num_blocks)]
    candidates = [Mask().remove(b) for b in blocks]
    print(f"{len(candidates)} candidates, windows {tuple(windows.shape)}, {args.threads} threads")

    timings: dict[str, float] = {}
    choices: dict[str, tuple[str, float]] = {}

    def record(name: str, nlls: list[tuple[float, int]], seconds: float) -> None:
        ppls = [math.exp(n / t) for n, t in nlls]
        best = min(range(len(ppls)), key=lambda i: (ppls[i], i))
        timings[name], choices[name] = seconds, (str(blocks[best]), ppls[best])
        print(f"{name:12s} {seconds:8.1f} s   best {blocks[best]} ppl {ppls[best]:.4f}")

    for name, eng in (("engine", streamed), ("engine-1stream", engine)):
        eng.evaluate(windows[: args.batch_size], candidates[:2], base=Mask())  # warm-up (allocator, rope)
        t0 = time.perf_counter()
        scores = eng.evaluate(windows, candidates, base=Mask())
        record(name, [(s.nll_sum, s.tokens) for s in scores], time.perf_counter() - t0)

    t0 = time.perf_counter()
    scores = engine.evaluate_naive(windows, candidates)
    record("naive-lean", [(s.nll_sum, s.tokens) for s in scores], time.perf_counter() - t0)

    t0 = time.perf_counter()
    scores = streamed.evaluate(windows, candidates, base=None)  # no base: every mask runs in full
    record("naive-streams", [(s.nll_sum, s.tokens) for s in scores], time.perf_counter() - t0)

    if not args.skip_stock:
        t0 = time.perf_counter()
        nlls = []
        for mask in candidates:
            with stock_masked(model, mask, arch):
                nlls.append(stock_nll(model, windows, args.batch_size))
        record("naive-stock", nlls, time.perf_counter() - t0)

    if len({c[0] for c in choices.values()}) != 1:
        raise SystemExit(f"methods disagree on the best block: {choices}")
    write_results(args, arch, timings, choices)


def write_results(args, arch: Arch, timings: dict[str, float], choices: dict[str, tuple[str, float]]) -> None:
    block, ppl = next(iter(choices.values()))
    rows = [f"| {name} | {sec:.1f} | {timings.get('naive-stock', math.nan) / sec:.2f}x | "
            f"{timings['naive-lean'] / sec:.2f}x |" for name, sec in timings.items()]
    section = "\n".join([
        MARKER,
        "## One full BlockPruner step (blocks, dense base)",
        "",
        f"`make bench` on {platform.machine()} with {args.threads} threads, {time.strftime('%Y-%m-%d')}: "
        f"{args.model} ({arch.num_blocks} candidates), calibration {args.sequences} x {args.length} tokens of "
        f"the wikipedia train split, batch {args.batch_size}, fp32, one worker, one run. The naive loops run "
        f"one candidate at a time on {args.threads} intra-op threads; `engine` runs {args.threads} candidate "
        f"suffixes concurrently on one thread each.",
        "",
        "| method | seconds | speedup vs naive-stock | speedup vs naive-lean |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"All methods chose **{block}** (calibration ppl {ppl:.4f}).",
        MARKER,
    ])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by `make bench`.\n\n"
    if MARKER in text:
        head, _, rest = text.partition(MARKER)
        _, _, tail = rest.partition(MARKER)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
