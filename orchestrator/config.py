"""Campaign configuration: the YAML of SPEC §4 as frozen dataclasses, validated before anything runs.

This module holds the config itself: the frozen dataclasses with their defaults, the search methods,
and :class:`ConfigError`. It imports nothing from :mod:`orchestrator`. The leaf value checks and the
schema table live in :mod:`orchestrator.config_checks`; reading, overriding, validating and dumping
a config (:func:`~orchestrator.config_load.load_config`, :func:`~orchestrator.config_load.dump_yaml`)
live in :mod:`orchestrator.config_load`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

#: Search methods the config accepts, and those implemented now. Extend ``IMPLEMENTED_METHODS`` only.
METHODS: tuple[str, ...] = ("blockpruner", "multipruner", "sprint", "optuna", "evolution")
IMPLEMENTED_METHODS: tuple[str, ...] = ("blockpruner", "multipruner", "optuna", "sprint", "evolution")


class ConfigError(ValueError):
    """A config with problems. ``problems`` lists them all, one line each (field: value; fix)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"invalid config ({count} problem{'' if count == 1 else 's'}):"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


# ---- the config ---------------------------------------------------------------------------------
#: Data protocols (``data.protocol``): rayprune's own windows, or a paper's calibration and held-out
#: windows cut as its code cuts them (orchestrator/data/protocols.py).
PROTOCOLS: tuple[str, ...] = ("rayprune", "blockpruner", "multipruner", "sprint", "evopress")
_WIKITEXT2 = "hf:Salesforce/wikitext:wikitext-2-raw-v1"  # the hub's WikiText-2 (the papers' "wikitext")
_WIKITEXT2_TEST = {"corpus": f"{_WIKITEXT2}:test:text", "sequences": None, "length": 2048, "seed": 0}
#: What each protocol puts in every ``data`` key the config leaves unset (see :func:`with_protocol`).
#: ``sequences: None``: every window the paper's cut gives (how many depends on the tokenizer).
PROTOCOL_PRESETS: dict[str, dict[str, Any]] = {
    "rayprune": {"corpus": "wikipedia", "calibration": {"sequences": 8, "length": 128, "seed": 0},
                 "evaluation": {"sequences": 16, "length": 256, "seed": 1234}},
    # BlockPruner block_search.py / eval.py: 256 Alpaca rows (its README), random.seed 42, WikiText-2 test
    "blockpruner": {"corpus": "hf:tatsu-lab/alpaca:train:text",
                    "calibration": {"rows": 256, "sequences": None, "length": 2048, "seed": 42},
                    "evaluation": _WIKITEXT2_TEST},
    # MultiPruner run_multipruner.py: 128 rows drawn for the width stages, then 256 for the block stage
    "multipruner": {"corpus": "hf:tatsu-lab/alpaca:train:text",
                    "calibration": {"rows": 256, "width_rows": 128, "sequences": None, "length": 2048, "seed": 42},
                    "evaluation": _WIKITEXT2_TEST},
    # SPRINT data_utils.get_wikitext2: 128 random 2048-token windows of WikiText-2 train, seed 0
    "sprint": {"corpus": f"{_WIKITEXT2}:train:text", "calibration": {"sequences": 128, "length": 2048, "seed": 0},
               "evaluation": _WIKITEXT2_TEST},
    # EvoPress data_utils.get_fineweb_edu: 131,072 FineWeb-Edu tokens (32 x 4096, its Llama-2 length)
    "evopress": {"corpus": "hf:HuggingFaceFW/fineweb-edu:sample-10BT:train:text",
                 "calibration": {"sequences": 32, "length": 4096, "seed": 0},
                 "evaluation": {**_WIKITEXT2_TEST, "length": 4096}},
}


@dataclass(frozen=True, kw_only=True)
class WindowsConfig:
    """Token windows: ``sequences`` windows of ``length`` tokens drawn from the corpus with ``seed``.

    ``windows`` (calibration only): a Parquet file of exact token windows (column ``input_ids``,
    e.g. another run's ``calibration.parquet``) used instead of drawing; the other fields are then
    not used to draw anything. A key set to null (where null is allowed) takes the protocol's value;
    ``sequences`` None there: every window the paper's cut gives (a number keeps the first that
    many). ``rows``/``width_rows``: Alpaca rows the BlockPruner/MultiPruner protocols draw.
    ``corpus`` (evaluation only): the held-out corpus (None: ``data.corpus``'s test split).
    """

    sequences: int | None = 8
    length: int = 128
    seed: int = 0
    windows: str | None = None
    rows: int | None = None  # blockpruner, multipruner: Alpaca rows drawn (MultiPruner: for the block stage)
    width_rows: int | None = None  # multipruner: rows drawn first, for the width stages
    corpus: str | None = None  # evaluation: held-out corpus (paper protocols: WikiText-2 test)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the calibration and evaluation windows come from, and how they are cut (``protocol``)."""

    protocol: str = "rayprune"  # see PROTOCOLS; a paper's name fills every unset key from PROTOCOL_PRESETS
    corpus: str = "wikipedia"  # a preset, a UTF-8 text file, or hf:<dataset>[:<config>]:<split>:<column>
    calibration: WindowsConfig = field(default_factory=WindowsConfig)
    evaluation: WindowsConfig = field(
        default_factory=lambda: WindowsConfig(sequences=16, length=256, seed=1234)
    )


def with_protocol(data: DataConfig, given: Mapping[str, Any] | None = None) -> DataConfig:
    """``data`` with every key its config did not set (or set to null) taken from its protocol's preset.

    ``given``: the ``data`` mapping as the config wrote it (which keys it set); None: nothing set
    but ``protocol``. ``DataConfig(protocol="sprint")`` alone keeps rayprune's defaults: build it
    with this function (``with_protocol(DataConfig(protocol="sprint"))``).
    """
    given = given if isinstance(given, Mapping) else {}
    preset = PROTOCOL_PRESETS[data.protocol]
    sections = {}
    for name in ("calibration", "evaluation"):
        set_here = given.get(name) if isinstance(given.get(name), Mapping) else {}
        unset = {k: v for k, v in preset[name].items() if set_here.get(k) is None}
        sections[name] = replace(getattr(data, name), **unset)
    corpus = data.corpus if "corpus" in given else preset["corpus"]
    return replace(data, corpus=corpus, **sections)


@dataclass(frozen=True, kw_only=True)
class SprintConfig:
    """SPRINT settings (``search.method: sprint``); the latency scenario is prefill + decode, batch 1.

    The defaults are what SPRINT's code (snudm-starlab/SPRINT) does; the other values are rayprune's
    earlier behaviour."""

    top_k: int = 5  # candidates per step whose next MLP's down_proj is refitted and re-scored
    ridge: float = 2048.0  # refit's pull towards the current weights, worth about this many tokens; 0: plain LS
    checkpoint_every: int | None = None  # layers between activation checkpoints; None: num_layers // 4
    metric: str = "l1"  # sum over sequences of |o - c| / |o|: l1 (SPRINT's l2_sentence computes L1) | l2
    reference: str = "window"  # o: every block from the candidate to its target runs, removed ones too (SPRINT) | current
    refit_target: str = "local"  # the refit reproduces o, the stream the score compares with (SPRINT) | dense
    memory: bool = True  # choose among this step's tuned top_k and earlier tuned scores still valid (SPRINT)
    no_mlp_score: str = "inf"  # tuned score of a candidate with no MLP after it: inf (SPRINT) | untuned
    latency_prompt: int = 1024  # latency = prefill of this many tokens ... (SPRINT: 1024)
    latency_generate: int = 512  # ... + this many decoded tokens (SPRINT: 512)
    latency_fixed: bool = False  # also count the fixed part (embeddings, LM head); SPRINT: kept blocks only
    latency_repeats: int = 5  # timing rounds per measurement (median)


@dataclass(frozen=True, kw_only=True)
class EvolutionConfig:
    """Evolutionary search on blocks (``search.method: evolution``), warm-started from BlockPruner's mask."""

    offspring: int = 32  # mutations of the parent scored per generation (EvoPress's)
    generations: int | None = None  # None: EvoPress's k (n - k) / 1.5 per kind (k of n blocks removed)
    max_swaps: int = 3  # swaps per mutation: min(U[1, s], U[1, s])
    max_evaluations: int | None = None  # stop once this many offspring were scored (None: no cap)
    max_tokens: int | None = None  # stop once the generations' scores cover this many calibration tokens
    # two-step selection: every offspring on this many calibration windows first ...; auto: EvoPress's share
    # (1/64 of the windows, at least one batch); None: one step on every window
    first_windows: int | str | None = "auto"
    survivors: int = 2  # ... and only this many best of them on all windows (None above: one step, all windows)


@dataclass(frozen=True, kw_only=True)
class RacingConfig:
    """Racing for blockpruner and multipruner: every candidate on a few windows, the best on all."""

    # round 1 on this many calibration windows, or rounds on increasing counts, e.g. (4, 8, 16); then a last
    # round on all windows. None: no racing (exact steps)
    windows: int | tuple[int, ...] | None = None
    keep: int = 3  # each later round: the best this many of the round before ...
    min_margin: float = 0.01  # ... and any within this much log-perplexity of them (or 3 x that round's error spread)
    probes: int = 1  # each cut also sends on this many of the candidates it cut, the best: their errors widen the margin
    audit: bool = False  # also score every candidate on all windows and record where racing chose otherwise


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """What to search for and how. The search stops at ``target_ratio`` or after ``max_steps``."""

    method: str = "blockpruner"  # see METHODS / IMPLEMENTED_METHODS
    fitness: str = "ppl"  # ppl | kl: mean KL(dense || mask) per token on the calibration windows (not sprint)
    kl_top_k: int | None = None  # kl: keep the dense model's top K tokens per position, the rest folded; None: all
    target_ratio: float | None = None  # removed / dense parameters, strictly inside (0, 1); required but for sprint
    max_steps: int | None = None  # None: no cap on greedy steps
    batch_size: int = 4  # calibration sequences per forward pass
    # MultiPruner (None: the model family's default, see search_spaces.budget.family_defaults)
    split: tuple[float, float, float] | None = None  # budget shares of blocks : MLP width : heads
    mlp_group: int | None = None  # MLP channels removed per width step
    head_group: int | None = None  # head units (KV groups under GQA) removed per head step
    order: tuple[str, ...] | None = None  # MultiPruner's stage order, e.g. [mlp, blocks, heads]; None: blocks, mlp, heads
    # how a stage that is not the last ends: overshoot (MultiPruner's loop: a stage's last step may pass its
    # budget, counted as MultiPruner counts) | within (never past its budget: rayprune before issue #14)
    stage_stop: str = "overshoot"
    # GQA head-unit L1 score of the channel order: n_rep (k/v rows weighed once per query head sharing them,
    # as MultiPruner) | once (rayprune before issue #14); the same order without GQA
    kv_weight: str = "n_rep"
    # Optuna: a study proposes whole masks with target_ratio <= ratio <= target_ratio + ratio_tolerance
    trials: int = 100  # masks the sampler proposes (repeats of a scored mask are free and not counted)
    batch: int | None = None  # trials asked per batch; None: two per evaluator
    sampler: str = "tpe"  # tpe | nsga2 (two objectives: perplexity and ratio)
    seed: int = 0
    ratio_tolerance: float | None = None  # None: the largest block's share (BlockPruner's largest overshoot)
    widths: bool = False  # also per-layer widths: head units by head_group, MLP channels by mlp_group
    warm_start: str = "blockpruner"  # blockpruner: its mask is the first trial | none
    # SPRINT: stops at target_ratio or target_speedup (estimated from the measured latency table), whichever first
    target_speedup: float | None = None  # dense latency / pruned latency, > 1 (sprint only)
    sprint: SprintConfig = field(default_factory=SprintConfig)
    # evolution: offspring drawn with search.seed
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    racing: RacingConfig = field(default_factory=RacingConfig)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Evaluator actors on Ray, and how the driver treats a slow or dead one."""

    actors: int | str = 1  # or "auto": as many as the cluster's resources allow
    cpus_per_actor: float = 1.0
    # fractions below 1 share a GPU; above 1 must be whole; "auto": the fewest GPUs that hold the model
    # and the engine's working memory in the dtype (cluster/replica_size.py), 0 on a cluster without GPUs
    gpus_per_actor: float | str = 0.0
    gpu_memory_gb: float | str = "auto"  # one GPU's memory in GB (1e9 bytes) for sizing replicas; auto: ask the cluster
    eval_timeout_s: float = 600.0  # one batch of masks on one actor
    max_attempts: int = 3  # per mask, before it is recorded as failed
    # replicas join as the cluster (its autoscaler) makes room, until this long; one must be placed by then.
    # About a GPU node's boot; a private local session waits at most 60 s (it never gains resources).
    placement_timeout_s: float = 900.0


@dataclass(frozen=True, kw_only=True)
class Config:
    """One campaign. ``output`` defaults to ``runs/<name>`` and is always a str once built."""

    name: str
    model: str  # a preset, a local Hugging Face directory, or a hub id
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: str | None = None
    export: bool = True  # write the compact model to <output>/model at the end
    # dtype of every replica: auto (bf16 on a CUDA GPU with native bf16, else fp16 on CUDA; fp32 on a
    # CPU) | bfloat16 | float16 | float32; part of the cache fingerprint; <output>/model is exported
    # in the dtype the replicas ran in
    dtype: str = "auto"
    # a LoRA recovery of <output>/model after the export (orchestrator.recovery_config.RecoveryConfig),
    # or None: none (`rayprune recover RUN` runs one later)
    recovery: Any = None

    def __post_init__(self) -> None:
        if self.output is None:
            object.__setattr__(self, "output", f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the resolved config (what :func:`~orchestrator.config_load.dump_yaml` writes)."""
        return asdict(self)
