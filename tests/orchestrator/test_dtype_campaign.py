"""A bf16 campaign on the CPU: the same BlockPruner search as fp32 where the choice is clear, and
perplexities within 1% of fp32's; and ``dtype`` travels from the config to the replicas and the export.

The in-process comparison uses a tiny Llama trained for a few seconds on a sparse Markov chain: a
random model's perplexities sit at the vocabulary size with candidate margins far below 1%, which
says nothing about precision. Trained, removing a block costs from under 1% to several-fold, so
some greedy steps are clear choices (fp32 margin over 2%) and some are near ties.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from actors.engine import Engine
from actors.forward import LeanDecoder
from orchestrator.search import BlockPrunerSearcher
from search_spaces import Mask
from tests.tiny import tiny_arch, tiny_model

MARGIN = 0.02  # steps whose fp32 best beats the second best by more than this must agree
MAX_STEPS = 7  # of the tiny model's 8 blocks


def _ppl(score) -> float:
    return math.exp(score.nll_sum / score.tokens)


def _markov(n: int, length: int, generator: torch.Generator, successors: torch.Tensor) -> torch.Tensor:
    """``n`` sequences of a chain where each token has 3 successors (probabilities 0.7, 0.2, 0.1)."""
    probs = torch.tensor([0.7, 0.2, 0.1]).expand(n, 3)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, successors.shape[0], (n,), generator=generator)
    for t in range(1, length):
        choice = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        x[:, t] = successors[x[:, t - 1], choice]
    return x


@pytest.fixture(scope="module")
def trained():
    """(fp32 model, its bf16 copy, calibration windows): the tiny Llama after 80 Adam steps."""
    arch = tiny_arch("llama")
    generator = torch.Generator().manual_seed(0)
    successors = torch.randint(0, arch.vocab_size, (arch.vocab_size, 3), generator=generator)
    data = _markov(80 * 16, 32, generator, successors)
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and deterministic
    try:
        for step in range(80):
            x = data[16 * step : 16 * step + 16]
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().requires_grad_(False)
    windows = _markov(8, 32, torch.Generator().manual_seed(5), successors)
    return model, copy.deepcopy(model).to(torch.bfloat16), windows


def _search(engine: Engine, windows: torch.Tensor, shadow: Engine | None = None):
    """BlockPruner driven by ``engine``; each step's candidate perplexities by ``engine`` and, scored
    on the same states, by ``shadow``."""
    searcher = BlockPrunerSearcher(tiny_arch("llama"), target_ratio=0.99, max_steps=MAX_STEPS)
    steps = []
    while (proposal := searcher.suggest()) is not None:
        current = searcher.current
        scores = {m: _ppl(s) for m, s in zip(proposal.masks, engine.score_masks(windows, proposal.masks, proposal.base))}
        candidates = [m for m in proposal.masks if m != current]
        other = {}
        if shadow is not None:
            other = {m: _ppl(s) for m, s in zip(candidates, shadow.score_masks(windows, candidates, proposal.base))}
        steps.append(({m: scores[m] for m in candidates}, other))
        searcher.observe(scores)
    return searcher, steps


def _margin(candidates: dict) -> float:
    best, second = sorted(candidates.values())[:2]
    return second / best - 1


def test_bf16_search_matches_fp32_where_the_choice_is_clear(trained):
    fp32_model, bf16_model, windows = trained
    arch = tiny_arch("llama")
    fp32 = Engine(LeanDecoder(fp32_model, arch), batch_size=4)
    bf16 = Engine(LeanDecoder(bf16_model, arch), batch_size=4)
    assert {p.dtype for p in bf16_model.parameters()} == {torch.bfloat16}

    # fp32's path, every step's candidates also scored in bf16 from the same state.
    reference, steps = _search(fp32, windows, shadow=bf16)
    assert len(reference.path) == MAX_STEPS
    clear = 0
    for step, (ours, theirs) in zip(reference.path, steps):
        assert theirs == pytest.approx(ours, rel=0.01)  # every candidate's perplexity within 1%
        if _margin(ours) > MARGIN:
            clear += 1
            assert min(theirs, key=theirs.get) == min(ours, key=ours.get) == step.mask, step
    assert clear >= 2  # the test compares real decisions, not only near ties

    # A bf16 search on its own: while its path is fp32's (same states), every clear step is taken
    # the same way and every perplexity is within 1%; it may only part ways at a near tie.
    alone, _ = _search(bf16, windows)
    assert alone.dense_ppl == pytest.approx(reference.dense_ppl, rel=0.01)
    for ours, theirs, (candidates, _) in zip(reference.path, alone.path, steps):
        if (theirs.kind, theirs.layer) != (ours.kind, ours.layer):
            assert _margin(candidates) <= MARGIN, ours
            break
        assert theirs.ppl == pytest.approx(ours.ppl, rel=0.01)
    agree = [(a.kind, a.layer) == (b.kind, b.layer) for a, b in zip(reference.path, alone.path)]
    print(f"\nbf16 vs fp32: dense {alone.dense_ppl:.4f} vs {reference.dense_ppl:.4f} "
          f"({alone.dense_ppl / reference.dense_ppl - 1:+.4%})")
    for a, b, (candidates, shadowed), same in zip(reference.path, alone.path, steps, agree):
        worst = max(abs(shadowed[m] / candidates[m] - 1) for m in candidates)
        print(f"  step {a.step}: fp32 {a.kind}{a.layer} {a.ppl:.4f} | bf16 {b.kind}{b.layer} {b.ppl:.4f} "
              f"({b.ppl / a.ppl - 1:+.4%}) same={same} fp32 margin {_margin(candidates):.2%} "
              f"worst candidate diff {worst:.3%}")


# ---- through Ray: the config's dtype reaches the replicas, the cache and the export ---------------
@pytest.mark.ray
def test_a_bf16_campaign_runs_on_the_cpu_and_exports_bf16(ray_session, tmp_path):
    import pyarrow.parquet as pq

    from actors.fingerprint import model_fingerprint
    from orchestrator.campaign import Campaign
    from orchestrator.data.windows import read_windows
    from tests.tiny import tiny_campaign_config, tiny_run_setup

    setup = tiny_run_setup(tmp_path)
    config = tiny_campaign_config(setup, "bf16", **{"search.target_ratio": 0.5, "search.max_steps": 2,
                                                    "cluster.actors": 1, "dtype": "bfloat16"})
    assert config.dtype == "bfloat16"
    campaign = Campaign(config, progress=False)
    run_dir = campaign.run().run_dir
    assert campaign.replica_dtype == "bfloat16"

    # One channel order, computed from the checkpoint, stored in the run, named by the cache and the export.
    from actors.permutation import Permutation, checkpoint_permutation

    stored = Permutation.load(run_dir / "permutation.safetensors")
    assert stored.digest == checkpoint_permutation(setup["model"]).digest == campaign.permutation.digest
    rows = pq.read_table(sorted((run_dir / "evals").glob("*.parquet"))).to_pylist()
    assert {r["model_fp"] for r in rows} == {model_fingerprint(setup["model"]) + f"+{stored.tag}+bfloat16"}
    exported = json.loads((run_dir / "model" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"
    assert exported["rayprune"]["reordered"] == stored.tag

    # Its perplexities are fp32's within 1% (the tiny random model: flat, so the path may differ).
    path = json.loads((run_dir / "path.json").read_text())
    windows = torch.as_tensor(read_windows(run_dir / "calibration.parquet"))
    arch = tiny_arch("llama")
    fp32 = Engine(LeanDecoder(tiny_model("llama"), arch), batch_size=2)
    assert path["dense_ppl"] == pytest.approx(_ppl(fp32.score_masks(windows, [Mask()])[0]), rel=0.01)
    for step in path["steps"]:
        mask = Mask.from_dict(step["mask"])
        assert step["ppl"] == pytest.approx(_ppl(fp32.score_masks(windows, [mask])[0]), rel=0.01)


@pytest.mark.parametrize("configured, replicas, exported", [
    ("bfloat16", "bfloat16", "bfloat16"),
    ("float16", "float16", "float16"),
    ("auto", "bfloat16", "bfloat16"),  # auto: what the replicas resolved it to (a GPU)
    ("auto", "float32", "float32"),  # ... (a CPU)
    ("auto", None, "auto"),  # no pool seen (outputs written without one): the checkpoint's own dtype
])
def test_the_campaign_exports_in_the_dtype_its_replicas_ran_in(tmp_path, monkeypatch, configured, replicas, exported):
    import actors.export
    import orchestrator.campaign as campaign_module
    from orchestrator.campaign import Campaign, CampaignResult
    from orchestrator.config_load import load_config
    from orchestrator.scorer import Counters

    config = load_config(None, ["name=x", "model=m", "search.target_ratio=0.5", f"output={tmp_path / 'run'}",
                                f"dtype={configured}"])
    calls = []
    monkeypatch.setattr(actors.export, "export_compact", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(campaign_module, "write_report", lambda run_dir: None)
    campaign = Campaign(config, progress=False)
    campaign.replica_dtype = replicas
    arch = tiny_arch("llama")
    searcher = BlockPrunerSearcher(arch, 0.5, max_steps=1)
    while (proposal := searcher.suggest()) is not None:
        searcher.observe({m: 2.0 + i for i, m in enumerate(proposal.masks)})
    result = CampaignResult(campaign.run_dir, searcher, {}, Counters(), 1.0, {"export": {"tuned": {}}})
    campaign.write_outputs(result, arch)
    assert calls == [{"dtype": exported, "permutation": None, "tuned": {}}]
