"""Benchmark: the cost of Parquet page checksums on the evaluation cache's parts.

    .venv/bin/python bench/cache_checksums.py

Writes one part of 10,000 realistic rows (distinct masks of a 32-layer model, ``normalize_row``-valid)
20 times with and 20 times without page checksums (:func:`orchestrator.cache_parts.write_part`:
dot-file, fsync, rename, fsync directory) and reads each back 20 times with verification
(:func:`orchestrator.cache_parts.read_part`), alternating the two so drift hits both alike. Prints
the median times and their ratio, and the time to open an ``EvalCache`` on the part (read plus the
per-row key check). Prints only: it does not write bench/RESULTS.md.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.cache import EvalCache
from orchestrator.cache_parts import normalize_row, read_part, write_part
from search_spaces import Block, Mask, mask_key

ROWS, REPEATS, LAYERS = 10_000, 20, 32
MODEL_FP, CALIB_FP = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32


def realistic_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct "ok" rows: random block removals and narrowings, as a campaign writes them."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        mask = Mask()
        for _ in range(rng.randint(1, 12)):
            mask = mask.remove(Block(rng.randrange(LAYERS), rng.choice(("attn", "mlp"))))
        if rng.random() < 0.3 and (layer := rng.randrange(LAYERS)) not in mask.mlp_removed:
            mask = mask.with_mlp_width(layer, 64 * rng.randint(1, 24))
        if (text := mask.to_json()) in seen:
            continue
        seen.add(text)
        nll = rng.uniform(2.0, 6.0) * 8192
        rows.append(normalize_row({
            "key": mask_key(mask, MODEL_FP, CALIB_FP), "mask_json": text, "model_fp": MODEL_FP,
            "calibration_fp": CALIB_FP, "nll_sum": nll, "tokens": 8192, "ppl": 2.718281828 ** (nll / 8192),
            "params_kept": rng.randint(50_000_000, 135_000_000), "ratio": rng.random(), "latency_est": None,
            "seconds": rng.uniform(0.5, 3.0), "worker": f"actor-{rng.randrange(4)}", "status": "ok"}))
    return rows


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> None:
    rows = realistic_rows(ROWS)
    times: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []} for k in ("without", "with")}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):
            for label, checksums in (("without", False), ("with", True)) if i % 2 else (("with", True),
                                                                                        ("without", False)):
                directory = Path(tmp) / f"{label}-{i}"
                seconds, part = timed(lambda: write_part(directory, rows, checksums=checksums))
                times[label]["write"].append(seconds)
                seconds, back = timed(lambda: read_part(part))
                times[label]["read"].append(seconds)
                assert len(back) == ROWS
                sizes[label] = part.stat().st_size
        open_s = [timed(lambda: EvalCache(Path(tmp) / "with-0"))[0] for _ in range(5)]
    print(f"one part of {ROWS:,} rows, median of {REPEATS} (write includes fsync; read verifies checksums):")
    medians = {label: {op: statistics.median(v) for op, v in ops.items()} for label, ops in times.items()}
    for op in ("write", "read"):
        without, with_ = medians["without"][op], medians["with"][op]
        print(f"  {op:5s}  without checksums {without * 1e3:7.1f} ms   with {with_ * 1e3:7.1f} ms   "
              f"ratio {with_ / without:.3f}")
    print(f"  size   without {sizes['without']:,} B   with {sizes['with']:,} B")
    print(f"  EvalCache open (read + per-row key check), median of 5: {statistics.median(open_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
