"""Benchmark: what the full-content model fingerprint costs, cold and from its digest cache.

    .venv/bin/python bench/fingerprint_cost.py [--gb 1.0] [--repeats 3]

``actors.fingerprint.model_fingerprint`` reads and hashes every byte of every safetensors file
unless the per-file digest cache (``fingerprints.json``) answers for it. This prints, in seconds and
GB/s (1 GB = 1e9 bytes):

- sha256 alone, one 8 MiB chunk hashed over and over (the CPU bound of this machine);
- a ~``--gb`` GB safetensors file of random bytes (created once under the temp directory, reused
  afterwards), its digest cache empty, the file in the page cache (as right after writing it, or
  in an actor that has just loaded the weights);
- the same, the page cache dropped first (``sync; echo 3 > /proc/sys/vm/drop_caches``: needs root;
  said so and skipped where it fails);
- the same, answered from the digest cache;
- SmolLM2-135M's converted model (``<rayprune cache>/models/smollm2-135m``) when it exists: cold
  and cached.

Every run uses a fresh temporary RAYPRUNE_CACHE, so the user's digest cache is neither read nor
written, and no file's times are changed but the benchmark's own. Cold rows are the fastest of
``--repeats`` runs. It leaves bench/RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from actors import fingerprint
from actors.models import cache_dir

GB = 1e9
BENCH_DIR = Path(tempfile.gettempdir()) / "rayprune-fingerprint-bench"


def model_dir(gb: float) -> Path:
    """A model directory with one ~``gb`` GB safetensors file of random uint8 (reused when present)."""
    from safetensors.numpy import save_file

    directory = BENCH_DIR / f"random-{gb:g}gb"
    weights = directory / "model.safetensors"
    if not weights.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        n = int(gb * GB)
        data = np.frombuffer(np.random.default_rng(0).bytes(n), dtype=np.uint8)
        partial = directory / ".model.safetensors.partial"
        save_file({"model.layers.0.blob": data}, str(partial), metadata={"format": "pt"})
        os.replace(partial, weights)
        (directory / "config.json").write_text(json.dumps({"model_type": "llama", "bench": True}))
    # Aged and settled, so the digest cache may keep it (a freshly written file is never cached).
    then = time.time_ns() - 3600 * 10**9
    for file in directory.iterdir():
        os.utime(file, ns=(then, then))
    time.sleep(fingerprint.SETTLE_SECONDS + 0.5)
    return directory


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (root only); False when that is not possible here."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def timed(directory: Path, *, digest_cache: str, drop: bool = False) -> tuple[float, str]:
    """Seconds of one ``model_fingerprint`` call; ``digest_cache``: "empty" (a fresh cache root)
    or "kept" (the current one, filled by an earlier call)."""
    if digest_cache == "empty":
        os.environ["RAYPRUNE_CACHE"] = tempfile.mkdtemp(prefix="cache-", dir=BENCH_DIR)
    if drop and not drop_page_cache():
        raise OSError("cannot drop the page cache here")
    t0 = time.perf_counter()
    value = fingerprint.model_fingerprint(directory)
    return time.perf_counter() - t0, value


def row(label: str, seconds: float, size: int) -> str:
    gb = size / GB
    rate = f"{gb / seconds:7.2f} GB/s" if seconds > 0.01 else "      - GB/s"  # a cache hit reads nothing
    return f"  {label:<52} {seconds:9.4f} s  {rate}  {seconds / gb:8.4f} s/GB  ({gb:.3f} GB)"


def measure(name: str, directory: Path, repeats: int, can_drop: bool) -> None:
    size = weight_bytes(directory)
    print(f"{name}: {directory}")
    hot = [timed(directory, digest_cache="empty") for _ in range(repeats)]
    assert len({v for _, v in hot}) == 1
    print(row("cold digest cache, file in page cache", min(s for s, _ in hot), size))
    if can_drop:
        cold = [timed(directory, digest_cache="empty", drop=True) for _ in range(repeats)]
        assert {v for _, v in cold} == {hot[0][1]}
        print(row("cold digest cache, page cache dropped (from disk)", min(s for s, _ in cold), size))
    cached = [timed(directory, digest_cache="kept") for _ in range(max(repeats, 5))]
    assert {v for _, v in cached} == {hot[0][1]}
    print(row("digest cache hit", min(s for s, _ in cached), size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the random weights file")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cold row (fastest shown)")
    args = parser.parse_args()

    smollm2 = cache_dir() / "models" / "smollm2-135m"  # the user's cache, before it is redirected
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    for old in BENCH_DIR.glob("cache-*"):  # digest caches of earlier runs
        shutil.rmtree(old)
    print(f"machine: {os.cpu_count()} CPUs; chunk {fingerprint._CHUNK >> 20} MiB")

    chunk = np.random.default_rng(1).bytes(fingerprint._CHUNK)  # one chunk, hot in the CPU's cache
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        digest = hashlib.sha256()
        for _ in range(32):
            digest.update(chunk)
        seconds.append(time.perf_counter() - t0)
    print(row("sha256 alone: one 8 MiB chunk x 32 (CPU bound)", min(seconds), 32 * len(chunk)))

    can_drop = drop_page_cache()
    print(f"page cache: {'can be dropped (root)' if can_drop else 'cannot be dropped here: cold rows read it from the page cache'}")
    measure("random weights", model_dir(args.gb), args.repeats, can_drop)
    if (smollm2 / "config.json").is_file():
        measure("SmolLM2-135M (converted preset)", smollm2, args.repeats, can_drop)
    else:
        print(f"SmolLM2-135M: {smollm2} not found (convert it with `rayprune` first); skipped")


if __name__ == "__main__":
    main()
