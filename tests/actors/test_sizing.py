"""GPUs per replica from accelerate's device map on the meta device, working memory kept back.

The expected figures are computed here independently: the model built with accelerate directly,
``max_memory`` by the rule written in actors/sizing.py, and accelerate's own map and module sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actors.sizing import MARGIN_BYTES, ReplicaTooLarge, replica_size, weights_bytes, working_for
from search_spaces.memory import WorkingMemory

LLAMA2_70B = {"model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
              "tie_word_embeddings": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
LLAMA2_7B = {**LLAMA2_70B, "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
             "num_attention_heads": 32, "num_key_value_heads": 32}
GB80 = 80 * 10**9
NOTHING = WorkingMemory(0, 0, 0)


def accelerate_map(config: dict, k: int, keep_back: float):
    """accelerate's device map of ``config`` in bf16 over k GPUs of 80 GB, each less ``keep_back``,
    as device_map="auto" computes it; and the module sizes."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    rest = dict(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(rest.pop("model_type"), **rest),
                                                 dtype=torch.bfloat16)
    no_split = list(model._no_split_modules)
    memory = get_balanced_memory(model, max_memory={i: int(GB80 - keep_back) for i in range(k)},
                                 no_split_module_classes=no_split, dtype=torch.bfloat16)
    mapping = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=torch.bfloat16)
    return mapping, compute_module_sizes(model, dtype=torch.bfloat16)


def keep_back(w: WorkingMemory, k: int, layers: int) -> float:
    return MARGIN_BYTES + w.anywhere + w.per_layer * (layers / k + 1)


def test_llama2_70b_in_bf16_on_80gb_gpus_agrees_with_accelerates_device_map():
    w = working_for(LLAMA2_70B, "bfloat16", batch_size=4, tokens=2048)
    size = replica_size(LLAMA2_70B, "bfloat16", GB80, w)
    assert size.gpus == 3
    mapping, sizes = accelerate_map(LLAMA2_70B, 3, keep_back(w, 3, 80))
    assert size.device_map == dict(mapping)
    assert set(mapping.values()) == {0, 1, 2}  # nothing on cpu or disk
    per_gpu = tuple(sum(sizes[n] for n, d in mapping.items() if d == i) for i in range(3))
    assert size.weights_per_gpu == per_gpu and sum(per_gpu) == sizes[""] == size.weights_bytes
    assert size.weights_bytes == 2 * 68_976_648_192 + 64 * 4  # SPEC §8: 68.98B parameters (+ fp32 rotary inv_freq)
    layers = [sum(1 for n, d in mapping.items() if n.startswith("model.layers.") and d == i) for i in range(3)]
    assert list(size.layers_per_gpu) == layers and sum(layers) == 80
    assert size.replica_bytes == sizes[""] + w.total
    need = [per_gpu[i] + w.anywhere + layers[i] * w.per_layer + MARGIN_BYTES for i in range(3)]
    assert list(size.need_per_gpu) == [int(n) for n in need] and max(need) <= GB80
    # Two GPUs: accelerate's map with the same rule sends layers to disk, so k = 3 is the smallest.
    two, _ = accelerate_map(LLAMA2_70B, 2, keep_back(w, 2, 80))
    assert "disk" in two.values()


def test_working_memory_pushes_llama2_70b_from_two_gpus_to_three():
    weights_only = replica_size(LLAMA2_70B, "bfloat16", GB80, NOTHING)
    assert weights_only.gpus == 2
    mapping, _ = accelerate_map(LLAMA2_70B, 2, MARGIN_BYTES)
    assert weights_only.device_map == dict(mapping) and set(mapping.values()) == {0, 1}
    with_working = replica_size(LLAMA2_70B, "bfloat16", GB80, working_for(LLAMA2_70B, "bfloat16", batch_size=4,
                                                                           tokens=2048))
    assert with_working.gpus == weights_only.gpus + 1


def test_llama2_7b_in_bf16_fits_one_80gb_gpu_and_fp32_70b_needs_more():
    size = replica_size(LLAMA2_7B, "bfloat16", GB80, working_for(LLAMA2_7B, "bfloat16", batch_size=4, tokens=2048))
    assert size.gpus == 1 and size.device_map == {"": 0} and size.layers_per_gpu == (32,)
    assert 12.5 < size.weights_bytes / 2**30 < 12.6  # SPEC §8: 12.6 GiB
    fp32 = replica_size(LLAMA2_70B, "float32", GB80, NOTHING)
    assert fp32.gpus == 4 and 256 < fp32.weights_bytes / 2**30 < 257.5  # 257 GiB


def test_too_large_says_what_it_needs_and_how_to_shrink_it():
    w = working_for(LLAMA2_70B, "bfloat16", batch_size=4, tokens=2048)
    expected = (r"needs 150\.2 GiB in bfloat16 \(128\.5 GiB weights \+ working memory 21\.7 GiB \(kept streams .* "
                r"does not fit 2 GPUs of 80 GB")
    with pytest.raises(ReplicaTooLarge, match=expected) as err:
        replica_size(LLAMA2_70B, "bfloat16", GB80, w, max_gpus=2)
    assert "search.batch_size" in str(err.value)


def test_sprint_working_memory_counts_in_the_replica():
    plain = working_for(LLAMA2_7B, "bfloat16", batch_size=4, tokens=2048)
    sprint = working_for(LLAMA2_7B, "bfloat16", batch_size=4, tokens=2048, sprint=True, windows=64)
    assert sprint.total > plain.total and sprint.sprint.refits > 0
    assert replica_size(LLAMA2_7B, "bfloat16", GB80, sprint).replica_bytes > \
        replica_size(LLAMA2_7B, "bfloat16", GB80, plain).replica_bytes


def test_meta_instantiation_of_70b_is_quick_and_small():
    """Building and sizing Llama-2-70B on the meta device: seconds of CPU and little RAM (no weights)."""
    # The peak is VmHWM of this process's own memory map: ru_maxrss would inherit pytest's across exec.
    code = ("import json, re, time; t = time.process_time(); from actors.sizing import weights_bytes; "
            f"n = weights_bytes({LLAMA2_70B!r}, 'bfloat16'); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps([n, time.process_time() - t, hwm]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    n, cpu_seconds, max_rss_kib = json.loads(out.stdout.strip().splitlines()[-1])
    assert n == weights_bytes(LLAMA2_70B, "bfloat16") > 137e9
    assert cpu_seconds < 15  # about 3 s here, torch and transformers imports included
    assert max_rss_kib < 1.5 * 2**20  # under 1.5 GiB (about 0.4 here) for a 128 GiB model
