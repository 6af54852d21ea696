"""Loading a campaign config: read the YAML, apply overrides, validate, and dump the resolved config.

Contract of :func:`load_config`:

- every problem of a config is found in one pass and reported in ONE :class:`ConfigError`, one line
  per problem, each naming the dotted field, the bad value and the fix;
- unknown keys are errors at every level (with the closest valid key suggested);
- every key can be overridden as ``a.b=value``; the value is parsed as YAML, so numbers, booleans and
  ``null`` work; overriding an unknown key is an error like any other;
- the resolved config written by :func:`dump_yaml` loads back to an equal :class:`Config`.

Relative paths (``data.calibration.windows``, ``output``) are relative to the working directory
the campaign runs in, as for any command-line tool. The config itself (the frozen dataclasses and
:class:`ConfigError`) is :mod:`orchestrator.config`; the leaf value checks and the schema table
live in :mod:`orchestrator.config_checks`, the schema walk and the overrides in :mod:`orchestrator.config_walk`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from search_spaces import Arch, UnsupportedArchitecture
from search_spaces.budget import check_multipruner, family_defaults, grid_group
from search_spaces.mask_space import MaskSpace, check_optuna

from .config import Config, ConfigError
from .recovery_config import build_recovery
from .config_checks import SCHEMA, protocol_problems, resolve_protocol
from .config_walk import _apply_override, _build
from .files import atomic_write
from .storage import uri_problem, uri_scheme


# ---- cross-field checks -------------------------------------------------------------------------
def _output_problem(output: str) -> str | None:
    """Why ``output`` cannot be created and written (None when it can). A URI is checked by its
    scheme here; the storage itself is opened when the campaign starts (orchestrator/storage.py)."""
    if uri_scheme(output) is not None:
        return uri_problem(output)
    probe = Path(output)
    try:
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if not probe.is_dir():
            return f"output: {output!r} cannot be created: {str(probe)!r} is not a directory; choose another output"
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"output: {output!r} is not writable ({str(probe)!r} is read-only); choose another output"
    except OSError as exc:
        return f"output: {output!r} cannot be checked ({exc}); choose another output"
    return None


def _model_line(model: str, exc: Exception) -> str:
    """``model: <message>``, naming the model unless the message already does."""
    return f"model: {exc}" if repr(model) in str(exc) else f"model: {model!r}: {exc}"


def _model_problems(model: str, check_model: Callable[[str], dict]) -> tuple[list[str], Arch | None]:
    """Problems with ``model`` (unreadable config, unsupported family), and its Arch when fine."""
    try:
        hf_config = check_model(model)
    except (ValueError, OSError) as exc:
        return [_model_line(model, exc)], None
    try:
        return [], Arch.from_hf_config(hf_config)
    except UnsupportedArchitecture as exc:
        return [_model_line(model, exc)], None
    except (KeyError, TypeError, ValueError) as exc:
        return [f"model: {model!r}: its config.json cannot be read as a decoder-only LM ({exc!r}); "
                f"use a Llama, Mistral or Qwen2 checkpoint"], None


def _optuna_problems(valid: dict[str, Any], arch: Arch) -> list[str]:
    """Optuna settings against the model: a ratio band the repair can always meet."""
    if "search.target_ratio" not in valid:
        return []
    return check_optuna(arch, valid["search.target_ratio"], valid.get("search.ratio_tolerance"),
                        widths=bool(valid.get("search.widths")),
                        mlp_group=valid.get("search.mlp_group") or grid_group(arch),
                        head_group=valid.get("search.head_group") or 1,
                        warm_start=valid.get("search.warm_start", "blockpruner"))


def _target_problems(valid: dict[str, Any]) -> list[str]:
    """A stopping point: target_ratio (every method) or target_speedup (sprint only).

    A missing target_ratio is taken out of ``valid`` so that later checks see it as absent.
    """
    method, speedup = valid.get("search.method"), valid.get("search.target_speedup")
    if method is not None and method != "sprint" and speedup is not None:
        return [f"search.target_speedup {speedup!r}: only search.method=sprint estimates latency; remove it, "
                f"or use search.method=sprint"]
    if "search.target_ratio" not in valid or valid["search.target_ratio"] is not None:
        return []  # given (or given wrong: reported already)
    valid.pop("search.target_ratio")
    if method == "sprint" and speedup is not None or "search.target_speedup" not in valid:
        return []  # a speedup target, or a wrong one that is reported already
    fix = " or search.target_speedup=1.3 (sprint stops at either)" if method == "sprint" else ""
    return [f"search.target_ratio: missing; it is required, set it in the YAML or as search.target_ratio=0.1{fix}"]


def _multipruner_problems(valid: dict[str, Any], arch: Arch) -> list[str]:
    """MultiPruner settings against the model: groups that leave a step (an MLP group below the width;
    it need not divide it, as in MultiPruner), a split that sums to 1."""
    defaults = family_defaults(arch)
    split = valid.get("search.split") or defaults.split
    return check_multipruner(arch, split, valid.get("search.mlp_group") or defaults.mlp_group,
                             valid.get("search.head_group") or defaults.head_group)


# ---- raw YAML and overrides ---------------------------------------------------------------------
def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"config file {str(path)!r} cannot be read ({exc.strerror}); check the path"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {exc}"]) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {str(path)!r}: top level is a {type(raw).__name__}; "
                           f"it must be a mapping (name: ..., model: ..., search: ...)"])
    return raw


# ---- public entry points ------------------------------------------------------------------------
def load_config(path: str | Path | None, overrides: Iterable[str] = (), *,
                check_model: Callable[[str], dict] | None = None) -> Config:
    """Read, override and validate a campaign config.

    ``path`` None starts from an empty config (everything from ``overrides``). ``check_model``
    (e.g. ``actors.models.read_model_config``) maps ``model`` to its Hugging Face config dict or
    raises ValueError; None skips the model checks. Raises one :class:`ConfigError` listing every
    problem; returns the fully resolved :class:`Config` otherwise.
    """
    raw = _read_yaml(path) if path is not None else {}
    problems = [p for p in (_apply_override(raw, o) for o in overrides) if p]
    valid: dict[str, Any] = {}
    recovery_raw = raw.pop("recovery", None)  # an optional section: absent (or null) means no recovery
    config = _build(SCHEMA, raw, "", None, problems, valid)
    if recovery_raw is not None:
        recovery, recovery_problems = build_recovery(recovery_raw)
        problems.extend(recovery_problems)
        if config is not None and recovery is not None:
            config = replace(config, recovery=recovery)
            if not config.export and recovery.model is None:
                problems.append("recovery: it fine-tunes <output>/model, which export: false does not write; "
                                "set export=true, or give recovery.model")
    problems.extend(protocol_problems(raw.get("data"), valid))  # data.protocol: its preset fills unset keys
    config = resolve_protocol(config, raw.get("data"))
    problems.extend(_target_problems(valid))
    method = valid.get("search.method")
    if method == "sprint" and config is not None and config.data.calibration.sequences is None:
        problems.append(f"data.calibration.sequences: search.method=sprint sizes its activation checkpoints by the "
                        f"number of calibration windows, which the {config.data.protocol} protocol leaves to its "
                        f"cut of the text; set a number, e.g. data.calibration.sequences=128")
    if valid.get("search.racing.windows") is not None and method is not None and method not in ("blockpruner",
                                                                                                  "multipruner"):
        problems.append(f"search.racing.windows: racing applies to blockpruner and multipruner, not {method}; "
                        f"remove it, or use search.method=blockpruner")
    if valid.get("search.widths") and method is not None and method not in ("optuna", "evolution"):
        problems.append(f"search.widths: per-layer widths are searched by optuna and evolution, not {method} "
                        f"(multipruner narrows layers in its own stages); remove it, or use search.method=evolution")
    if valid.get("search.fitness") == "kl" and method == "sprint":
        problems.append("search.fitness: kl does not apply to sprint, which ranks blocks by local sensitivity; "
                        "remove it, or use another search.method")
    if "model" in valid and check_model is not None:
        model_problems, arch = _model_problems(valid["model"], check_model)
        problems.extend(model_problems)
        if arch is not None and valid.get("search.method") == "multipruner":
            problems.extend(_multipruner_problems(valid, arch))
        if arch is not None and valid.get("search.method") == "optuna":
            problems.extend(_optuna_problems(valid, arch))
        if arch is not None and valid.get("search.method") == "evolution" and valid.get("search.widths"):
            problems.extend(MaskSpace(arch, 0.5, widths=True, head_group=valid.get("search.head_group") or 1,
                                      mlp_group=valid.get("search.mlp_group") or grid_group(arch)
                                      ).group_problems())
    output = valid.get("output") or (f"runs/{valid['name']}" if "name" in valid else None)
    if output is not None and (problem := _output_problem(output)):
        problems.append(problem)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def to_yaml(config: Config) -> str:
    """The resolved config as YAML text, headed by the command that runs it."""
    header = f"# Resolved config of campaign {config.name!r}. Run it with: rayprune run CONFIG.yaml\n"
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def dump_yaml(config: Config, path: str | Path) -> Path:
    """Write the resolved config to ``path`` atomically (:func:`orchestrator.files.atomic_write`)."""
    return atomic_write(path, to_yaml(config))
