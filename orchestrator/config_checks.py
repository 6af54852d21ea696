"""Leaf value checks of the campaign config and the schema table that binds them to its fields.

A leaf check takes ``(value, dotted field)`` and returns the clean value or raises :class:`BadValue`
(reason; fix). :data:`SCHEMA` maps every section of :class:`~orchestrator.config.Config` to its
dataclass and every key to its check or subsection; ``orchestrator.config_walk._build`` walks it.
This module imports from :mod:`orchestrator.config` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from dataclasses import replace
from typing import Any, Callable, Mapping

from .config import (IMPLEMENTED_METHODS, METHODS, PROTOCOLS, ClusterConfig, Config, DataConfig, EvolutionConfig,
                     RacingConfig, SearchConfig, SprintConfig, WindowsConfig, with_protocol)


# ---- leaf checks: return the clean value or raise BadValue(reason; fix) --------------------------
class BadValue(Exception):
    """A leaf value is wrong; the message says why and how to fix it."""


Check = Callable[[Any, str], Any]  # (value, dotted field) -> clean value
_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # YAML 1.1 reads "1e-1" as a str
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any, path: str, example: str) -> float:
    if isinstance(value, str) and _EXPONENT.match(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadValue(f"is not a number; use e.g. {path}={example}")
    if value != value or value in (float("inf"), float("-inf")):
        raise BadValue(f"is not a finite number; use e.g. {path}={example}")
    return float(value)


def _string(example: str) -> Check:
    def check(value: Any, path: str) -> str:
        if _is_int(value):  # YAML reads a bare 2024 as an int
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadValue(f"is not a non-empty string; use e.g. {path}={example}")
        return value

    return check


def _name(value: Any, path: str) -> str:
    value = _string("demo")(value, path)
    if not _NAME.match(value):
        raise BadValue(f"is not a usable directory name; use letters, digits, '.', '_', '-', e.g. {path}=demo")
    return value


def _int(minimum: int, example: int, *, optional: bool = False) -> Check:
    word = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def check(value: Any, path: str) -> int | None:
        if value is None and optional:
            return None
        if not _is_int(value) or value < minimum:
            fix = f"use e.g. {path}={example}" + (f" or {path}=null" if optional else "")
            raise BadValue(f"is not {word}; {fix}")
        return value

    return check


def _float(minimum: float, example: str, *, strict: bool) -> Check:
    def check(value: Any, path: str) -> float:
        number = _number(value, path, example)
        if number < minimum or (strict and number == minimum):
            word = ">" if strict else ">="
            raise BadValue(f"must be {word} {minimum:g}; use e.g. {path}={example}")
        return number

    return check


def _fraction(value: Any, path: str) -> float:
    number = _number(value, path, "0.1")
    if not 0.0 < number < 1.0:
        raise BadValue(f"is not strictly between 0 and 1 (the fraction of parameters to remove); "
                      f"use e.g. {path}=0.1")
    return number


def _split(value: Any, path: str) -> tuple[float, float, float] | None:
    """``44:52:4``, ``[0.44, 0.52, 0.04]`` or null; shares in percent are scaled to fractions."""
    if value is None:
        return None
    if _is_int(value):  # YAML 1.1 reads 44:52:4 as the base-60 integer 161524: read it back
        digits = []
        while value:
            value, digit = divmod(value, 60)
            digits.insert(0, digit)
        value = digits
    parts = value.split(":") if isinstance(value, str) else value
    try:
        shares = tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        raise BadValue(f"is not a split; use e.g. {path}=44:52:4 (blocks : MLP width : heads)") from None
    total = sum(shares)
    if abs(total - 100) < 1e-6:
        shares = tuple(x / 100 for x in shares)
    if len(shares) != 3 or any(x < 0 for x in shares) or abs(sum(shares) - 1) > 1e-6:
        raise BadValue(f"must be three non-negative shares summing to 1 (or 100); use e.g. {path}=44:52:4")
    return shares  # type: ignore[return-value]


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise BadValue(f"is not true or false; use e.g. {path}=false")
    return value


def _gpus(value: Any, path: str) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, str) and not _EXPONENT.match(value):
        raise BadValue(f"is not a number of GPUs or 'auto'; use e.g. {path}=1 or {path}=auto (the fewest GPUs "
                       f"that hold the model in its dtype)")
    number = _float(0.0, "1", strict=False)(value, path)
    if number > 1 and not number.is_integer():
        raise BadValue(f"above 1 must be a whole number of GPUs; use e.g. {path}={int(number)}")
    return number


def _gpu_memory(value: Any, path: str) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, str) and not _EXPONENT.match(value):
        raise BadValue(f"is not a GPU memory in GB or 'auto'; use e.g. {path}=80 or {path}=auto (ask the cluster)")
    return _float(0.0, "80", strict=True)(value, path)


def _actors(value: Any, path: str) -> int | str:
    if value == "auto" or (_is_int(value) and value >= 1):
        return value
    raise BadValue(f"is not a positive integer or 'auto'; use e.g. {path}=2 or {path}=auto")


def _method(value: Any, path: str) -> str:
    use = ", ".join(IMPLEMENTED_METHODS)
    if value not in METHODS:
        raise BadValue(f"is not a search method; use one of {', '.join(METHODS)} ({use} implemented)")
    if value not in IMPLEMENTED_METHODS:
        raise BadValue(f"is not implemented yet; use {use}")
    return value


def _one_of(options: tuple[str, ...]) -> Check:
    def check(value: Any, path: str) -> str:
        if value not in options:
            raise BadValue(f"is not one of {', '.join(options)}; use e.g. {path}={options[0]}")
        return value

    return check


#: MultiPruner's stages, by the names ``search.order`` uses.
STAGES: tuple[str, ...] = ("blocks", "mlp", "heads")


def _order(value: Any, path: str) -> tuple[str, ...] | None:
    """``[mlp, blocks, heads]``, ``mlp,blocks,heads`` or null: every stage exactly once."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or sorted(map(str, parts)) != sorted(STAGES):
        raise BadValue(f"must name each of {', '.join(STAGES)} once; use e.g. {path}=blocks,mlp,heads")
    return tuple(str(p) for p in parts)


def _auto_or_windows(value: Any, path: str) -> int | str | None:
    """A window count, ``auto`` or null."""
    if value == "auto":
        return value
    try:
        return _int(1, 4, optional=True)(value, path)
    except BadValue:
        raise BadValue(f"is not a positive integer, auto or null; use e.g. {path}=4 or {path}=auto") from None


def _racing_windows(value: Any, path: str) -> int | tuple[int, ...] | None:
    """Racing's rounds before the last: ``4`` (one round on 4 windows), ``[4, 8, 16]`` or ``4,8,16``
    (increasing window counts), or null (no racing)."""
    if value is None or _is_int(value):
        return _int(1, 4, optional=True)(value, path)
    parts = value.split(",") if isinstance(value, str) else value
    try:
        counts = tuple(int(p) for p in parts) if isinstance(parts, (list, tuple)) and parts else ()
    except (TypeError, ValueError):
        counts = ()
    if (not counts or any(c < 1 for c in counts) or any(b <= a for a, b in zip(counts, counts[1:]))
            or any(isinstance(p, (bool, float)) for p in parts)):
        raise BadValue(f"is not a window count or a list of increasing ones; use e.g. {path}=4 (one round on 4 "
                       f"windows, then all) or {path}=[4,8,16] (successive rounds), or {path}=null")
    return counts[0] if len(counts) == 1 else counts


def _optional_fraction(value: Any, path: str) -> float | None:
    return None if value is None else _fraction(value, path)


def _optional_speedup(value: Any, path: str) -> float | None:
    if value is None:
        return None
    number = _number(value, path, "1.3")
    if not number > 1.0:
        raise BadValue(f"is not above 1 (dense latency / pruned latency); use e.g. {path}=1.3")
    return number


def _windows_file(value: Any, path: str) -> str | None:
    if value is None:
        return None
    value = _string("runs/other/calibration.parquet")(value, path)
    if not Path(value).is_file():
        raise BadValue(f"is not an existing file (relative to {os.getcwd()}); point it at a Parquet file of "
                      f"token windows, e.g. another run's calibration.parquet, or remove the key")
    return value


def _no_windows(value: Any, path: str) -> None:
    if value is not None:
        raise BadValue("is not supported: evaluation windows are always drawn from data.corpus; remove the key")
    return None


# ---- data.protocol (orchestrator/data/protocols.py) ----------------------------------------------
def _calibration_corpus(value: Any, path: str) -> None:
    if value is not None:
        raise BadValue("is not supported: calibration windows come from data.corpus; set data.corpus instead")
    return None


def _no_rows(value: Any, path: str) -> None:
    if value is not None:
        raise BadValue("is not supported: held-out windows are cut from the whole evaluation corpus; remove the key")
    return None


def _optional_corpus(value: Any, path: str) -> str | None:
    return None if value is None else _string("hf:Salesforce/wikitext:wikitext-2-raw-v1:test:text")(value, path)


_UNSET = object()
_ROWS_PROTOCOLS = ("blockpruner", "multipruner")  # the Alpaca samplers: rows drawn, every window they give


def protocol_problems(raw: Any, valid: Mapping[str, Any]) -> list[str]:
    """``data`` settings that do not fit ``data.protocol``, one line each.

    Only keys the config sets are judged (``raw``: its ``data`` mapping), and a null is never wrong
    (it takes the protocol's value), so the resolved config.yaml of a run loads back unchanged.
    """
    protocol = valid.get("data.protocol")
    if protocol is None:
        return []
    raw = raw if isinstance(raw, Mapping) else {}

    def given(section: str, key: str) -> Any:
        sub = raw.get(section)
        return sub.get(key, _UNSET) if isinstance(sub, Mapping) else _UNSET

    problems = []
    for key, applies in (("rows", _ROWS_PROTOCOLS), ("width_rows", ("multipruner",))):
        if given("calibration", key) not in (None, _UNSET) and protocol not in applies:
            problems.append(f"data.calibration.{key}: Alpaca rows are drawn by the {' and '.join(applies)} "
                            f"protocol{'s' if len(applies) > 1 else ''}, not {protocol}; remove it, or set "
                            f"data.protocol={applies[0]}")
    if protocol != "rayprune":
        for dotted, value in (("data.corpus", raw.get("corpus", _UNSET)), ("data.evaluation.corpus",
                                                                            given("evaluation", "corpus"))):
            if isinstance(value, str) and not value.startswith("hf:") and not Path(value).expanduser().is_file():
                problems.append(f"{dotted} {value!r}: the {protocol} protocol reads rows through datasets; give a hub "
                                f"dataset hf:NAME[:CONFIG]:SPLIT:COLUMN or an existing local .jsonl/.json/.parquet/"
                                f".txt file (relative to {os.getcwd()}), or remove the key for the paper's dataset")
    return problems


def resolve_protocol(config: Config | None, raw: Any) -> Config | None:
    """``config`` with every ``data`` key its YAML left unset taken from ``data.protocol``'s preset."""
    if config is None:
        return None
    return replace(config, data=with_protocol(config.data, raw if isinstance(raw, Mapping) else None))


#: The ``dtype`` setting (``actors.models.DTYPES``; this module imports no torch).
DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")


def _dtype(value: Any, path: str) -> str:
    if value not in DTYPES:
        raise BadValue(f"is not a dtype; use one of {', '.join(DTYPES)}, e.g. {path}=auto (bf16 on a GPU that "
                       f"supports it, fp16 on other GPUs, fp32 on a CPU)")
    return value


def _optional_string(value: Any, path: str) -> str | None:
    return None if value is None else _string("runs/demo")(value, path)


# ---- the schema: section -> (dataclass, {key: check or subsection}) -----------------------------
Section = tuple[type, dict[str, Any]]
_WINDOWS: dict[str, Any] = {"sequences": _int(1, 8, optional=True), "length": _int(1, 128), "seed": _int(0, 0)}
SCHEMA: Section = (Config, {
    "name": _name,
    "model": _string("smollm2-135m"),
    "data": (DataConfig, {
        "protocol": _one_of(PROTOCOLS),
        "corpus": _string("wikipedia"),
        "calibration": (WindowsConfig, {**_WINDOWS, "windows": _windows_file, "rows": _int(1, 256, optional=True),
                                        "width_rows": _int(1, 128, optional=True), "corpus": _calibration_corpus}),
        "evaluation": (WindowsConfig, {**_WINDOWS, "windows": _no_windows, "rows": _no_rows,
                                       "width_rows": _no_rows, "corpus": _optional_corpus}),  # always drawn
    }),
    "search": (SearchConfig, {
        "method": _method,
        "fitness": _one_of(("ppl", "kl")),
        "kl_top_k": _int(1, 256, optional=True),
        "target_ratio": _optional_fraction,
        "max_steps": _int(1, 10, optional=True),
        "batch_size": _int(1, 4),
        "split": _split,
        "mlp_group": _int(1, 256, optional=True),
        "head_group": _int(1, 1, optional=True),
        "order": _order,
        "stage_stop": _one_of(("overshoot", "within")),
        "kv_weight": _one_of(("n_rep", "once")),
        "trials": _int(1, 100),
        "batch": _int(1, 4, optional=True),
        "sampler": _one_of(("tpe", "nsga2")),
        "seed": _int(0, 0),
        "ratio_tolerance": _optional_fraction,
        "widths": _bool,
        "warm_start": _one_of(("blockpruner", "none")),
        "target_speedup": _optional_speedup,
        "sprint": (SprintConfig, {
            "top_k": _int(1, 5),
            "ridge": _float(0.0, "0.1", strict=False),
            "checkpoint_every": _int(1, 7, optional=True),
            "metric": _one_of(("l1", "l2")),
            "reference": _one_of(("window", "current")),
            "refit_target": _one_of(("local", "dense")),
            "memory": _bool,
            "no_mlp_score": _one_of(("inf", "untuned")),
            "latency_prompt": _int(1, 1024),
            "latency_generate": _int(0, 512),
            "latency_fixed": _bool,
            "latency_repeats": _int(1, 5),
        }),
        "evolution": (EvolutionConfig, {
            "offspring": _int(1, 16),
            "generations": _int(1, 100, optional=True),
            "max_swaps": _int(1, 3),
            "max_evaluations": _int(1, 1000, optional=True),
            "max_tokens": _int(1, 1000000, optional=True),
            "first_windows": _auto_or_windows,
            "survivors": _int(1, 2),
        }),
        "racing": (RacingConfig, {
            "windows": _racing_windows,
            "keep": _int(1, 3),
            "min_margin": _float(0.0, "0.01", strict=False),
            "probes": _int(0, 1),
            "audit": _bool,
        }),
    }),
    "cluster": (ClusterConfig, {
        "actors": _actors,
        "cpus_per_actor": _float(0.0, "1", strict=False),
        "gpus_per_actor": _gpus,
        "gpu_memory_gb": _gpu_memory,
        "eval_timeout_s": _float(0.0, "600", strict=True),
        "max_attempts": _int(1, 3),
        "placement_timeout_s": _float(0.0, "900", strict=True),
    }),
    "output": _optional_string,
    "export": _bool,
    "dtype": _dtype,
})
