"""The remaining actor paths on emulated multi-GPU replicas placed by accelerate itself (SPEC section 8).

tests/actors/test_devices.py places modules with the harness's own hooks; here the real loaders run:
``actors.models.load_model`` / ``actors.export.load_pruned`` with an accelerate ``device_map`` of
integer GPUs, so transformers' loading and accelerate's ``dispatch_model`` hooks (inputs moved to
each module's device, outputs back to the caller's) do the placing, under the device emulation
(tests/emulation.py) with ``torch.cuda`` answering as a machine with two GPUs would.

Paths: the evaluator load (the L1 reorder on a dispatched replica) and its evaluations, the latency
table, held-out perplexity, the compact export loaded onto emulated GPUs, and zero-shot evaluation
(lm_eval's HFLM; skipped without the optional extra). Each runs on 1 and 2 emulated GPUs with tied
and untied LM heads, with masks that remove the blocks on both sides of the device boundary (layers
0-1 on cuda:0, 2-3 on cuda:1: MLP 1 ends cuda:0, attention 2 starts cuda:1), and gives the plain
CPU numbers (NLL within 1e-5 relative); the harness raises on any device mixing.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path
from typing import Iterator
from unittest import mock

import numpy as np
import pytest
import torch

from actors.evaluator import Evaluator
from actors.export import export_compact, load_pruned
from actors.heldout import heldout_score
from actors.models import load_model, load_tokenizer
from search_spaces import Mask
from tests.emulation import DeviceEmulation, checkpoint_saver, device_of, emulate, mixes
from tests.tiny import char_tokenizer, tiny_arch

LAYERS = 4
LAYOUTS = [pytest.param(n, tied, id=f"{n}dev-{'tied' if tied else 'untied'}") for n in (1, 2) for tied in (False, True)]
MASKS = [
    Mask(),
    Mask(mlp_removed={1}, attn_removed={2}),  # both sides of the boundary
    Mask(attn_removed={0}, mlp_removed={3}, head_units={2: 1}, mlp_width={1: 24}),  # widths on both devices
    Mask(attn_removed={2, 3}, mlp_removed={2, 3}),  # nothing left on cuda:1 but the norm (and an untied head)
]
#: The export's mask: the boundary blocks removed, layers on both devices narrowed.
EXPORT_MASK = Mask(mlp_removed={1}, attn_removed={2}, head_units={0: 1, 3: 1}, mlp_width={2: 24})
TASK = Path(__file__).resolve().parents[1] / "data" / "tiny_mc.yaml"


def accelerate_map(n: int, tied: bool) -> dict[str, int]:
    """An accelerate ``device_map`` over ``n`` GPUs (integers, as accelerate writes them): contiguous
    runs of layers, the final norm and rotary embedding on the last GPU, a tied LM head with the
    embedding it shares (accelerate keeps tied parameters together), an untied one on the last GPU."""
    mapping = {"model.embed_tokens": 0}
    mapping.update({f"model.layers.{i}": i * n // LAYERS for i in range(LAYERS)})
    mapping.update({"model.norm": n - 1, "model.rotary_emb": n - 1, "lm_head": 0 if tied else n - 1})
    return mapping


@contextlib.contextmanager
def emulated_gpus(n: int = 2) -> Iterator[DeviceEmulation]:
    """Device emulation, with ``torch.cuda`` answering as a machine with ``n`` bf16-capable GPUs
    (what transformers, accelerate and the latency clock ask)."""
    answers = {"is_available": lambda: True, "device_count": lambda: n, "current_device": lambda: 0,
               "mem_get_info": lambda *a, **k: (80 << 30, 80 << 30), "synchronize": lambda *a, **k: None,
               "get_device_name": lambda *a, **k: "Emulated GPU", "is_bf16_supported": lambda *a, **k: True,
               "empty_cache": lambda: None, "get_device_properties": lambda *a, **k: types.SimpleNamespace(
                   name="Emulated GPU", total_memory=80 << 30, major=9, minor=0, multi_processor_count=132)}
    with contextlib.ExitStack() as stack:
        for name, answer in answers.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, answer))
        yield stack.enter_context(emulate())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved tiny checkpoints (safetensors + tokenizer): (family, tied) -> directory."""
    return checkpoint_saver(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Latency tables and permutation caches go to this test's directory; the process-wide TF32
    switches an fp32 replica on (emulated) CUDA turns on are restored afterwards."""
    monkeypatch.setenv("RAYPRUNE_CACHE", str(tmp_path / "cache"))
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _windows(n: int, t: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, tiny_arch("llama").vocab_size, size=(n, t))


def _same_scores(got: list[dict], expected: list[dict], what) -> None:
    for g, e, m in zip(got, expected, what):
        assert g["tokens"] == e["tokens"] and g["nll_sum"] == pytest.approx(e["nll_sum"], rel=1e-5), m


# ---- accelerate's dispatch runs under the emulation, and a planted mix is caught ----------------------
def test_accelerate_places_the_model_and_a_missing_hook_is_caught(checkpoints):
    from accelerate.hooks import remove_hook_from_module

    path = checkpoints("llama", False)
    ids = torch.as_tensor(_windows(2, 12, 0))
    with torch.inference_mode():
        expected = load_model(path).forward(ids).logits
    with emulated_gpus(), torch.inference_mode():
        model = load_model(path, device_map=accelerate_map(2, tied=False))
        placed = {name: device_of(p) for name, p in model.named_parameters()}
        assert placed["model.embed_tokens.weight"] == placed["model.layers.1.mlp.up_proj.weight"] == "cuda:0"
        assert placed["model.layers.2.self_attn.q_proj.weight"] == placed["lm_head.weight"] == "cuda:1"
        assert hasattr(model.model.layers[2], "_hf_hook")  # accelerate's AlignDevicesHook, not the harness's
        logits = model(ids.to("cuda:0")).logits
        assert device_of(logits) == "cuda:0"  # accelerate moves outputs back to the input's device
        assert torch.allclose(logits.cpu(), expected, rtol=1e-5, atol=1e-6)
        remove_hook_from_module(model.model.layers[2])  # layer 2 no longer fetches its inputs from cuda:0
        with mixes():
            model(ids.to("cuda:0"))


# ---- the evaluator: load with the reorder under a device_map, then evaluate ---------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_evaluator_load_and_evaluate(checkpoints, family, n, tied):
    path = checkpoints(family, tied)
    windows = {"calibration": _windows(5, 24, 1), "evaluation": _windows(3, 32, 2)}
    masks = [m.to_json() for m in MASKS]
    base = Mask(mlp_removed={1}).to_json()
    kwargs = dict(model=path, windows=windows, batch_size=2, dtype="float32", reorder=True)
    reference = Evaluator(device_map=None, **kwargs)
    expected = {"prefix": reference.evaluate("calibration", masks, Mask().to_json()),
                "full": reference.evaluate("calibration", masks, None),
                "from a removal": reference.evaluate("calibration", masks[1:2], base),
                "held-out": reference.evaluate("evaluation", masks[:2], Mask().to_json())}
    with emulated_gpus():
        evaluator = Evaluator(device_map=accelerate_map(n, tied), **kwargs)
        info = evaluator.info()
        layers = evaluator.model.model.layers
        assert info["device"] == "cuda:0" and info["dtype"] == "float32"
        assert device_of(layers[3].mlp.down_proj.weight) == f"cuda:{n - 1}"
        assert device_of(evaluator.windows["calibration"]) == "cuda:0"
        got = {"prefix": evaluator.evaluate("calibration", masks, Mask().to_json()),
               "full": evaluator.evaluate("calibration", masks, None),
               "from a removal": evaluator.evaluate("calibration", masks[1:2], base),
               "held-out": evaluator.evaluate("evaluation", masks[:2], Mask().to_json())}
    assert info["model_fingerprint"] == reference.info()["model_fingerprint"]  # same weights, same order
    for name, scores in expected.items():
        _same_scores(got[name], scores, MASKS if name != "from a removal" else MASKS[1:2])


@pytest.mark.parametrize("device_map,gpus", [("cuda", 1), ("auto", 2)])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_evaluator_placed_as_start_evaluators_places_it(checkpoints, device_map, gpus, tied):
    """``cluster.session.start_evaluators``: ``cuda`` for one GPU, ``auto`` (accelerate's balanced map)
    for more; ``dtype: auto`` is bf16 on a GPU that has it, and scores as a bf16 CPU replica does."""
    path = checkpoints("llama", tied)
    windows = {"calibration": _windows(4, 24, 6)}
    masks = [m.to_json() for m in MASKS]
    reference = Evaluator(model=path, windows=windows, batch_size=2, dtype="bfloat16", device_map=None)
    expected = reference.evaluate("calibration", masks, Mask().to_json())
    with emulated_gpus(gpus):
        evaluator = Evaluator(model=path, windows=windows, batch_size=2, dtype="auto", device_map=device_map)
        placed = {device_of(layer.mlp.up_proj.weight) for layer in evaluator.model.model.layers}
        got = evaluator.evaluate("calibration", masks, Mask().to_json())
    assert evaluator.info()["dtype"] == "bfloat16" and evaluator.info()["device"] == "cuda:0"
    assert placed == {f"cuda:{i}" for i in range(gpus)}  # auto spreads the tiny model over both GPUs
    assert evaluator.model_fingerprint == reference.model_fingerprint
    _same_scores(got, expected, MASKS)


# ---- the latency table on the replica's device ---------------------------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_latency_table(checkpoints, n, tied):
    path = checkpoints("llama", tied)
    ids = _windows(2, 16, 3)
    with emulated_gpus():
        evaluator = Evaluator(model=path, windows={"calibration": ids}, batch_size=2, dtype="float32",
                              device_map=accelerate_map(n, tied), reorder=True)
        before = evaluator.evaluate("calibration", [Mask().to_json()])
        table = evaluator.latency_table(prompt=8, generate=2, repeats=1)
        after = evaluator.evaluate("calibration", [Mask().to_json()])
    assert table["device"] == "Emulated_GPU" and table["meta"]["dtype"] == "float32"
    assert set(table["costs"]) == {"prefill:8", "decode:8"}
    for key, costs in table["costs"].items():
        assert all(costs[k] > 0 for k in ("fixed", "attn", "mlp")), key
        assert len(table["meta"]["per_layer"][key]["attn"]) == LAYERS
    assert after == [{**before[0], "seconds": after[0]["seconds"]}]  # the replica is left as it was


# ---- held-out perplexity of a dispatched dense model ----------------------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_heldout_score_of_a_dispatched_model(checkpoints, family, n, tied):
    path = checkpoints(family, tied)
    windows = _windows(3, 40, 4)
    expected = heldout_score(load_model(path), windows, batch_size=2)
    with emulated_gpus():
        model = load_model(path, device_map=accelerate_map(n, tied))
        got = heldout_score(model, windows, batch_size=2)
    assert got.tokens == expected.tokens and got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-5)


# ---- the compact export, loaded onto emulated GPUs -------------------------------------------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_export_loads_onto_gpus_and_scores_what_the_replica_scored(checkpoints, tmp_path, family, n, tied):
    path = checkpoints(family, tied)
    windows = _windows(3, 40, 5)
    out = export_compact(path, EXPORT_MASK, tmp_path / "export")
    expected = heldout_score(load_pruned(out), windows, batch_size=2)
    replica = Evaluator(model=path, windows={"evaluation": windows}, batch_size=2, dtype="float32", reorder=True)
    [scored] = replica.evaluate("evaluation", [EXPORT_MASK.to_json()])
    assert expected.nll_sum == pytest.approx(scored["nll_sum"], rel=1e-5)  # the export is the model scored
    with emulated_gpus():
        model = load_pruned(out, device_map=accelerate_map(n, tied))
        layers = model.model.layers
        assert device_of(layers[3].self_attn.q_proj.weight) == device_of(model.model.norm.weight) == f"cuda:{n - 1}"
        assert device_of(layers[0].mlp.down_proj.weight) == "cuda:0"
        assert device_of(model.lm_head.weight) == ("cuda:0" if tied else f"cuda:{n - 1}")
        got = heldout_score(model, windows, batch_size=2)
    assert got.tokens == expected.tokens and got.nll_sum == pytest.approx(expected.nll_sum, rel=1e-5)
    assert json.loads((out / "config.json").read_text())["rayprune"]["mask"] == EXPORT_MASK.to_dict()


# ---- zero-shot evaluation (lm_eval's HFLM) on the export placed over emulated GPUs -----------------------
@pytest.mark.parametrize("n,tied", LAYOUTS)
def test_zero_shot_on_emulated_gpus(checkpoints, tmp_path, n, tied):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from actors.zeroshot import zero_shot

    out = export_compact(checkpoints("llama", tied), EXPORT_MASK, tmp_path / "export")
    tokenizer = load_tokenizer(out)
    docs = [json.loads(line) for line in (TASK.parent / "tiny_mc.jsonl").read_text().splitlines()]
    requests = [(d["question"], " " + c) for d in docs[:5] for c in d["choices"]]

    def run(model) -> tuple[dict, list[float], str]:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
        return (zero_shot(model, tokenizer, [str(TASK)], batch_size=4),
                [ll for ll, _ in lm.loglikelihood([_request(c, x) for c, x in requests], disable_tqdm=True)],
                str(lm.device))

    expected, expected_ll, _ = run(load_pruned(out))
    with emulated_gpus() as mode:
        model = load_pruned(out, device_map=accelerate_map(n, tied))
        checked = mode.ops_checked
        got, got_ll, device = run(model)
    assert device == "cuda:0" and mode.ops_checked > checked + 1000  # lm_eval really ran on the emulated GPUs
    assert got == expected and got["rayprune_tiny_mc"]["samples"] == 20
    assert got_ll == pytest.approx(expected_ll, rel=1e-5)


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance("loglikelihood", {}, (context, continuation), 0)


# ---- a SPRINT step spread over window shards, and KL fitness: bf16 replicas over 2 GPUs --------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sprint_phases_and_kl_on_a_bf16_replica_over_two_gpus(checkpoints, tmp_path, tied):
    """What a GPU user's pool runs: ``sprint_shard`` / ``sprint_solve`` on two window shards (the
    refit sums summed on the driver, solved on the replica, weights read back from files) and
    ``evaluate(fitness="kl")`` per shard, on a bf16 replica over 2 emulated GPUs: the numbers of a
    bf16 CPU replica running the whole step in one call."""
    from orchestrator.rundir import StepStore
    from orchestrator.sprint_pool import PoolStep
    from search_spaces.latency import BlockCosts
    from search_spaces.sprint import StepRequest, present_blocks
    from tests.orchestrator.test_sprint_pool import InProcessPool

    path = checkpoints("llama", tied)
    windows = {"calibration": _windows(8, 20, 9)}
    request = StepRequest("calibration", Mask(), candidates=tuple(present_blocks(Mask(), LAYERS)),
                          costs=BlockCosts(0.2, 0.1, 0.25), top_k=3, ridge=0.1, checkpoint_every=1)
    reference = Evaluator(model=path, windows=windows, batch_size=2, dtype="bfloat16", device_map=None)
    whole = PoolStep(InProcessPool([reference]), StepStore(tmp_path / "one"), num_layers=LAYERS,
                     n_windows={"calibration": 8}, batch_size=2, timeout_s=60).run(request)
    masks = [Mask().to_json(), MASKS[1].to_json()]
    kl_expected = reference.evaluate("calibration", masks, Mask().to_json(), fitness="kl:16")
    with emulated_gpus(2):
        evaluator = Evaluator(model=path, windows=windows, batch_size=2, dtype="bfloat16",
                              device_map=accelerate_map(2, tied))
        assert device_of(evaluator.model.model.layers[3].mlp.down_proj.weight) == "cuda:1"
        # The same replica holds both shards: the memo keeps one shard's streams, the other walks again.
        pool = PoolStep(InProcessPool([evaluator, evaluator]), StepStore(tmp_path / "two"), num_layers=LAYERS,
                        n_windows={"calibration": 8}, batch_size=2, timeout_s=60)
        sharded = pool.run(request)
        kl_shards = [evaluator.evaluate("calibration", masks, Mask().to_json(), rows, fitness="kl:16")
                     for rows in ((0, 4), (4, 8))]
    assert sharded["shards"] == 2 and sharded["tokens"] == whole["tokens"]
    assert sharded["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-5)
    for s, value in whole["sensitivity"].items():
        assert sharded["sensitivity"][s] == pytest.approx(value, rel=1e-4, abs=1e-6), s
    assert sharded["top"] == whole["top"] and sharded["choice"]["block"] == whole["choice"]["block"]
    assert [t["status"] for t in sharded["tuned"]] == [t["status"] for t in whole["tuned"]]
    assert whole["choice"]["weight"] is not None, "the choice needed no refit: nothing compared"
    np.testing.assert_allclose(sharded["choice"]["weight"], whole["choice"]["weight"], rtol=1e-3, atol=1e-4)
    assert all(abs(k[0]["nll_sum"]) < 1e-6 for k in kl_shards)  # the dense model's KL to itself
    assert kl_expected[1]["nll_sum"] > 1e-3
    for i, expected in enumerate(kl_expected):
        assert sum(k[i]["nll_sum"] for k in kl_shards) == pytest.approx(expected["nll_sum"], rel=1e-5, abs=1e-6)
        assert sum(k[i]["tokens"] for k in kl_shards) == expected["tokens"]


# ---- the GQA channel order (MultiPruner's n_rep weighting) on a bf16 replica over two GPUs -----------
def test_head_units_in_multipruners_order_on_a_bf16_replica_over_two_gpus(tmp_path, family):
    """Layer 3 (on cuda:1) planted so that the two weightings of k/v disagree: the replica's order is
    MultiPruner's (unit 1 first), its rows sit on cuda:1 in bf16, a one-unit width keeps that unit,
    and the scores equal the plain CPU replica's of the same order; the earlier order keeps the other."""
    from safetensors.torch import load_file

    from actors.permutation import METHOD_KV_REP, checkpoint_permutation
    from tests.actors.test_permutation import planted_state
    from tests.tiny import tiny_model

    arch = tiny_arch(family)
    model = tiny_model(family)
    model.load_state_dict(planted_state(family, arch, layer=3))
    path = tmp_path / "planted"
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    windows = {"calibration": _windows(4, 24, 3)}
    masks = [Mask().to_json(), Mask(head_units={3: 1}).to_json(), Mask(head_units={3: 1}, mlp_width={1: 24}).to_json()]
    once = checkpoint_permutation(path, kv_weight="once")
    kwargs = dict(model=str(path), windows=windows, batch_size=2, dtype="bfloat16")
    expected = {name: Evaluator(**kwargs, permutation=p).evaluate("calibration", masks, Mask().to_json())
                for name, p in (("n_rep", None), ("once", once))}
    with emulated_gpus():
        replica = Evaluator(**kwargs, device_map=accelerate_map(2, tied=False))
        earlier = Evaluator(**kwargs, device_map=accelerate_map(2, tied=False), permutation=once)
        assert replica.permutation.method == METHOD_KV_REP and replica.permutation.units[3].tolist() == [1, 0]
        assert earlier.permutation.units[3].tolist() == [0, 1]
        q = replica.model.model.layers[3].self_attn.q_proj.weight
        k = replica.model.model.layers[3].self_attn.k_proj.weight
        assert device_of(q) == device_of(k) == "cuda:1" and q.dtype == torch.bfloat16
        stored = load_file(str(path / "model.safetensors"))
        g, hd = arch.heads_per_unit, arch.head_dim
        assert torch.equal(q[: g * hd].cpu(), stored["model.layers.3.self_attn.q_proj.weight"][g * hd:].to(torch.bfloat16))
        assert torch.equal(k[:hd].cpu(), stored["model.layers.3.self_attn.k_proj.weight"][hd:].to(torch.bfloat16))
        got = {"n_rep": replica.evaluate("calibration", masks, Mask().to_json()),
               "once": earlier.evaluate("calibration", masks, Mask().to_json())}
    for name in got:
        _same_scores(got[name], expected[name], masks)
    assert got["n_rep"][0]["nll_sum"] == pytest.approx(got["once"][0]["nll_sum"], rel=1e-2)  # dense: same model
    assert got["n_rep"][1]["nll_sum"] != got["once"][1]["nll_sum"]  # one unit kept: a different one


# ---- SPRINT's semantics across the device boundary: windows, memory, refit targets, bf16 over 2 GPUs -----
@pytest.mark.parametrize("refit_target", ["local", "dense"])
def test_sprint_windows_memory_and_refit_targets_on_a_bf16_replica_over_two_gpus(checkpoints, tmp_path, refit_target):
    """MLP 1 (cuda:0) and attention 2 (cuda:1) removed: the ``window`` references of attention 1 and
    MLP 0 run them again across the boundary, MLP 1 with the refit it carried when it was removed; a
    remembered score (attention 1, target MLP 2 on cuda:1) wins and is refitted again after the
    rescore; the refit aims at the reference (``local``) or the dense stream. Sharded over two
    window shards on the emulated GPUs, the numbers of a bf16 CPU replica running the whole step."""
    from orchestrator.rundir import StepStore
    from orchestrator.sprint_pool import PoolStep
    from search_spaces.latency import BlockCosts
    from search_spaces.sprint import StepRequest, present_blocks, tensor_key
    from tests.orchestrator.test_sprint_pool import InProcessPool

    path = checkpoints("llama", False)
    arch = tiny_arch("llama")
    windows = {"calibration": _windows(8, 20, 11)}
    mask = MASKS[1]
    dormant = (0.05 * np.random.default_rng(2).standard_normal((arch.hidden_size, arch.intermediate_size))
               ).astype(np.float32)
    sha = tensor_key(dormant.shape, "float32", dormant.tobytes())
    stores = [StepStore(tmp_path / "one"), StepStore(tmp_path / "two")]
    for store in stores:
        store.save_weight(dormant, sha)
    request = StepRequest("calibration", mask, tuned=((1, sha),), candidates=tuple(present_blocks(mask, LAYERS)),
                          costs=BlockCosts(0.0, 0.1, 0.25), top_k=2, ridge=0.1, checkpoint_every=1,
                          refit_target=refit_target, remembered=((2, 0.0),))
    reference = Evaluator(model=path, windows=windows, batch_size=2, dtype="bfloat16", device_map=None)
    whole = PoolStep(InProcessPool([reference]), stores[0], num_layers=LAYERS, n_windows={"calibration": 8},
                     batch_size=2, timeout_s=60).run(request)
    with emulated_gpus(2):
        evaluator = Evaluator(model=path, windows=windows, batch_size=2, dtype="bfloat16",
                              device_map=accelerate_map(2, False))
        pool = PoolStep(InProcessPool([evaluator, evaluator]), stores[1], num_layers=LAYERS,
                        n_windows={"calibration": 8}, batch_size=2, timeout_s=60)
        sharded = pool.run(request)
    assert sharded["shards"] == 2 and sharded["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-5)
    for s, value in whole["sensitivity"].items():
        assert sharded["sensitivity"][s] == pytest.approx(value, rel=1e-4, abs=1e-6), s
    assert sharded["top"] == whole["top"] and 2 not in whole["top"]
    assert [t["status"] for t in sharded["tuned"]] == [t["status"] for t in whole["tuned"]]
    assert sharded["choice"]["block"] == whole["choice"]["block"] == 2 and whole["choice"]["status"] == "ok"
    np.testing.assert_allclose(sharded["choice"]["weight"], whole["choice"]["weight"], rtol=1e-3, atol=1e-4)
