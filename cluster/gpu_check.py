"""First thing to run on a new cluster: are the GPUs there, does a replica load, does a mask evaluate?

    ray job submit --working-dir . -- python cluster/gpu_check.py --model /shared/Llama-2-7b-hf --gpus-per-replica 1
    python cluster/gpu_check.py --model smollm2-135m --gpus-per-replica 1      # on one GPU machine

It starts one evaluator replica over ``--gpus-per-replica`` GPUs of one node (the same placement a
campaign uses), prints what it sees, scores the dense model and one block removal on a few token
windows, and checks the engine's prefix reuse against a full forward on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gpus-per-replica", type=float, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per window")
    args = parser.parse_args()

    import numpy as np
    import ray

    from cluster.session import connect, start_evaluators
    from search_spaces import Block, Mask

    started = connect(num_cpus=os.cpu_count())
    print("cluster resources:", json.dumps(ray.cluster_resources()))
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < args.gpus_per_replica:
        print(f"FAIL: the cluster has {gpus:g} GPUs; a replica needs {args.gpus_per_replica:g}")
        return 1

    @ray.remote(num_gpus=args.gpus_per_replica)
    def devices() -> dict:
        import torch

        return {"cuda": torch.cuda.is_available(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "torch": torch.__version__, "cuda_version": torch.version.cuda}

    print("a replica's view:", json.dumps(ray.get(devices.remote())))
    windows = {"check": np.random.default_rng(0).integers(0, 1000, size=(2, args.tokens))}
    t0 = time.perf_counter()
    [actor] = start_evaluators(1, 1, args.gpus_per_replica, model=args.model, windows=windows, dtype=args.dtype,
                               reorder=False)
    info = ray.get(actor.info.remote())
    print(f"replica loaded in {time.perf_counter() - t0:.1f} s:", json.dumps(info))
    masks = [Mask(), Mask().remove(Block(1, "mlp"))]
    t0 = time.perf_counter()
    fast = ray.get(actor.evaluate.remote("check", [m.to_json() for m in masks], Mask().to_json()))
    seconds = time.perf_counter() - t0
    full = ray.get(actor.evaluate.remote("check", [masks[1].to_json()], None))
    ppl = [math.exp(r["nll_sum"] / r["tokens"]) for r in fast]
    agree = math.isclose(fast[1]["nll_sum"], full[0]["nll_sum"], rel_tol=1e-3)
    print(f"dense ppl {ppl[0]:.3f}, without mlp1 {ppl[1]:.3f}, {seconds:.2f} s for 2 masks; "
          f"prefix reuse vs full forward: {'agree' if agree else 'DISAGREE'}")
    if started:
        ray.shutdown()
    return 0 if agree and all(math.isfinite(p) for p in ppl) else 1


if __name__ == "__main__":
    raise SystemExit(main())
