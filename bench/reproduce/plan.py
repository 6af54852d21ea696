"""What the Llama-2-7B reproduction runs: its rows, and each row's steps as ``rayprune`` commands.

A row is one line of the papers' tables. Its steps are plain ``rayprune`` commands (``run`` with a
config written under ``--out``, ``inspect``, ``export``, ``eval``), so a dry run prints exactly what a
user could type, and a step's outcome is whatever that command prints (``--json``). Nothing here
imports torch or Ray: the plan is built and checked in milliseconds.

Every step has a *key*: what decides its result (the command without the resources it runs on, and
the campaign config without its ``cluster`` section). A rerun skips a step whose key and outputs are
already there (``runner.py``), so changing ``--actors`` resumes, changing ``--dtype`` recomputes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .published import SPRINT_SPEEDUP

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
#: MultiPruner's published Llama-2-7B 22% config (data/SOURCE.md).
PUBLISHED_CONFIG = HERE / "data" / "llama-2-7b.ratio_22.pruning_config.json"
DEFAULT_MODEL = "meta-llama/Llama-2-7b-hf"


@dataclass(frozen=True)
class Row:
    """A table row: how it is produced, on which protocol, with which zero-shot set(s)."""

    name: str
    method: str  # what the table says produced it
    protocol: str  # data.protocol of its campaign / --protocol of its eval
    dtype: str  # the paper code's dtype (``--dtype`` replaces it)
    tasks: tuple[str, ...]  # named zero-shot sets (actors.zeroshot.TASK_SETS)
    config: str | None = None  # campaign config under configs/ (None: no campaign)
    dtype_source: str = ""


ROWS: dict[str, Row] = {row.name: row for row in (
    Row("dense", "dense model", "blockpruner", "bfloat16", ("blockpruner", "sprint"),
        dtype_source="BlockPruner's setup, whose table gives the dense figures"),
    Row("blockpruner", "BlockPruner search", "blockpruner", "bfloat16", ("blockpruner",), "blockpruner.yaml",
        dtype_source="SPEC §2: BlockPruner in bf16"),
    Row("multipruner-published", "MultiPruner's published pruning_config.json", "multipruner", "float16",
        ("multipruner",), dtype_source="run_multipruner.py: torch_dtype float16"),
    Row("multipruner", "MultiPruner search", "multipruner", "float16", ("multipruner",), "multipruner.yaml",
        dtype_source="run_multipruner.py: torch_dtype float16"),
    Row("sprint", "SPRINT search", "sprint", "float16", ("sprint",), "sprint.yaml",
        dtype_source="SPRINT get_llm: torch_dtype float16"),
)}
#: The table's order (the papers'), and the order rows run in: cheapest first, so the first
#: figures arrive in minutes and BlockPruner's hours come last.
TABLE_ORDER = tuple(ROWS)
RUN_ORDER = ("dense", "multipruner-published", "sprint", "multipruner", "blockpruner")


@dataclass(frozen=True)
class Options:
    """The reproduction's settings, as the command line gives them (see llama2_7b.py)."""

    model: str = DEFAULT_MODEL
    out: Path = Path("runs/reproduce")
    only: tuple[str, ...] = TABLE_ORDER
    gpus_per_actor: float | str = 1  # 0: CPUs (--allow-cpu)
    actors: int | str = "auto"
    tasks: bool = True
    dtype: str | None = None  # None: each row's paper dtype
    sprint_speedup: float = SPRINT_SPEEDUP
    pruning_config: Path = PUBLISHED_CONFIG
    alpaca: str | None = None  # local copies of the protocols' datasets (None: the hub's)
    wikitext_train: str | None = None
    wikitext_test: str | None = None
    eval_length: int | None = None  # held-out windows of this many tokens instead of the protocol's 2048
    sets: tuple[str, ...] = ()  # [ROW:]KEY=VALUE overrides of the campaign configs
    on_cluster: bool = True  # evaluate in a Ray task on a GPU (False: on this process's CPU)


@dataclass(frozen=True)
class Step:
    """One ``rayprune`` command of a row. ``config``: a campaign config written to ``config_path``
    before the command runs; ``output``: the file whose presence says the step's work is on disk."""

    row: str
    name: str  # run | inspect | export | eval
    argv: tuple[str, ...]  # after ``rayprune``; decides the result
    resources: tuple[str, ...] = ()  # appended options that do not change the result
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    output: Path | None = None
    parse_json: bool = False  # the command prints its result as one JSON line

    @property
    def id(self) -> str:
        return f"{self.row}/{self.name}"

    @property
    def command(self) -> tuple[str, ...]:
        return (*self.argv, *self.resources)

    @property
    def key(self) -> str:
        config = {k: v for k, v in (self.config or {}).items() if k != "cluster"}
        return json.dumps({"argv": self.argv, "config": config}, sort_keys=True)

    def config_text(self) -> str:
        """The YAML written to ``config_path``, headed by the command that runs it."""
        assert self.config is not None and self.config_path is not None
        return (f"# rayprune run {self.config_path} --no-progress\n"
                f"# Written by bench/reproduce/llama2_7b.py (row {self.row}) from "
                f"bench/reproduce/configs/{ROWS[self.row].config}; edit that file, not this one.\n"
                + yaml.safe_dump(self.config, sort_keys=False, default_flow_style=False))

    def write_config(self) -> Path | None:
        """Write ``config_text`` to ``config_path`` (campaign steps); returns the path, None for other steps."""
        if self.config is None or self.config_path is None:
            return None
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text(), encoding="utf-8")
        return self.config_path


def parse_sets(sets: tuple[str, ...]) -> list[tuple[str | None, str, Any]]:
    """``[ROW:]KEY=VALUE`` overrides as (row or None, dotted key, YAML value); ValueError naming a bad one."""
    parsed = []
    for item in sets:
        target, sep, text = item.partition("=")
        row, colon, key = target.rpartition(":")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected [ROW:]KEY=VALUE, e.g. --set search.batch_size=2 or "
                             f"--set sprint:search.sprint.top_k=3")
        if colon and row not in ROWS or colon and ROWS[row].config is None:
            campaigns = ", ".join(r.name for r in ROWS.values() if r.config)
            raise ValueError(f"--set {item!r}: {row!r} is not a row with a campaign; use one of {campaigns}")
        parsed.append((row if colon else None, key.strip(), yaml.safe_load(text)))
    return parsed


def _put(config: dict[str, Any], dotted: str, value: Any) -> None:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[last] = value


def campaign_config(row: Row, options: Options) -> dict[str, Any]:
    """``configs/<row>.yaml`` with the model, output, resources, dtype, local datasets and ``--set``
    overrides of ``options`` filled in (a plain dict, validated later by ``load_config``)."""
    config = yaml.safe_load((CONFIGS / str(row.config)).read_text(encoding="utf-8"))
    _put(config, "model", options.model)
    _put(config, "output", str(options.out / row.name / "run"))
    _put(config, "dtype", options.dtype or row.dtype)
    _put(config, "cluster.actors", options.actors)
    _put(config, "cluster.gpus_per_actor", options.gpus_per_actor)
    corpus = options.wikitext_train if row.protocol == "sprint" else options.alpaca
    if corpus:
        _put(config, "data.corpus", corpus)
    if options.wikitext_test:
        _put(config, "data.evaluation.corpus", options.wikitext_test)
    if row.name == "sprint":
        _put(config, "search.target_speedup", options.sprint_speedup)
    for target, key, value in parse_sets(options.sets):
        if target in (None, row.name):
            _put(config, key, value)
    return config


def _eval_step(row: Row, options: Options, source: str, dtype: str | None = None) -> Step:
    argv = ["eval", source, "--protocol", row.protocol, "--json"]
    if options.wikitext_test:
        argv += ["--corpus", options.wikitext_test]
    if options.eval_length:
        argv += ["--length", str(options.eval_length)]
    if dtype:
        argv += ["--dtype", dtype]
    if options.tasks:
        argv += ["--tasks", *row.tasks]
    resources = ["--on", "cluster" if options.on_cluster else "driver"]
    if options.on_cluster and options.gpus_per_actor != "auto":
        resources += ["--gpus", _number(options.gpus_per_actor)]
    return Step(row.name, "eval", tuple(argv), tuple(resources), parse_json=True)


def _number(value: float | str) -> str:
    return str(int(value)) if isinstance(value, (int, float)) and float(value).is_integer() else str(value)


def row_steps(row: Row, options: Options) -> list[Step]:
    """The commands of one row, in order."""
    where = options.out / row.name
    dtype = options.dtype or row.dtype
    if row.name == "dense":
        return [_eval_step(row, options, options.model, dtype)]
    if row.name == "multipruner-published":
        config, model = str(options.pruning_config), str(where / "model")
        return [Step(row.name, "inspect", ("inspect", options.model, "--pruning-config", config, "--json"),
                     parse_json=True),
                Step(row.name, "export", ("export", options.model, "--pruning-config", config, "--out", model,
                                          "--dtype", dtype), output=where / "model" / "config.json"),
                _eval_step(row, options, model)]
    run_dir = where / "run"
    config_path = where / "config.yaml"
    return [Step(row.name, "run", ("run", str(config_path)), ("--no-progress",), campaign_config(row, options),
                 config_path, output=run_dir / "path.json"),
            _eval_step(row, options, str(run_dir))]


def build_plan(options: Options) -> list[Step]:
    """Every step of the rows in ``options.only``, in :data:`RUN_ORDER`; ValueError for an unknown row."""
    unknown = [name for name in options.only if name not in ROWS]
    if unknown:
        raise ValueError(f"--only: unknown row{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"rows are {', '.join(TABLE_ORDER)}")
    parse_sets(options.sets)  # a malformed --set fails here, before anything
    return [step for name in RUN_ORDER if name in options.only for step in row_steps(ROWS[name], options)]


def describe(row: Row, options: Options) -> str:
    """One line: method, protocol, target, dtype and zero-shot sets."""
    if row.config:
        search = campaign_config(row, options)["search"]
        target = (f"speedup {search['target_speedup']:g}x" if search.get("target_speedup")
                  else f"ratio {search['target_ratio']:g}")
    else:
        target = Path(options.pruning_config).name if row.name == "multipruner-published" else "no pruning"
    tasks = " + ".join(row.tasks) if options.tasks else "off (--no-tasks)"
    return (f"{row.name}: {row.method}; protocol {row.protocol}; target {target}; dtype {options.dtype or row.dtype} "
            f"({'--dtype' if options.dtype else row.dtype_source}); zero-shot sets: {tasks}")
