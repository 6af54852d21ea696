"""Walking a config schema and applying ``a.b=value`` overrides: shared by the campaign config
(:mod:`orchestrator.config_load`) and the recovery settings (:mod:`orchestrator.recovery_config`).

A schema is ``(dataclass, {key: leaf check or sub-schema})`` (:data:`orchestrator.config_checks.SCHEMA`).
:func:`_build` checks a raw mapping against it and collects every problem, one line each, so that a
config's errors are reported together.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, fields
from typing import Any, Iterable, Mapping

import yaml

from .config_checks import BadValue, Section


# ---- walking the schema (config_checks.SCHEMA) --------------------------------------------------
def _default(cls: type, defaults: Any, key: str) -> Any:
    """Default of ``cls.key``: from the parent's default instance, else the dataclass; MISSING if none."""
    if defaults is not None:
        return getattr(defaults, key)
    spec = {f.name: f for f in fields(cls)}[key]
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return MISSING


def _unknown_key(key: Any, path: str, known: Iterable[str]) -> str:
    dotted = f"{path}{key}"
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    hint = f"did you mean {path}{close[0]}?" if close else f"valid keys here: {', '.join(known)}"
    return f"{dotted}: unknown key; {hint}"


def _build(section: Section, raw: Mapping[str, Any], path: str, defaults: Any,
           problems: list[str], valid: dict[str, Any]) -> Any:
    """Check ``raw`` against ``section``; return the dataclass, or None if anything was wrong.

    Every problem is appended to ``problems``; every leaf that passed is recorded in ``valid``
    (dotted field -> clean value) so that cross-field checks can run on a partly broken config.
    """
    cls, spec = section
    problems.extend(_unknown_key(k, path, spec) for k in raw if k not in spec)
    values: dict[str, Any] = {}
    ok = True
    for key, check in spec.items():
        dotted, default = f"{path}{key}", _default(cls, defaults, key)
        if isinstance(check, tuple):
            sub = raw.get(key, {})
            sub = {} if sub is None else sub
            if not isinstance(sub, Mapping):
                problems.append(f"{dotted}: {sub!r} is not a section; write it as a mapping of keys")
                ok = False
                continue
            parent = None if default is MISSING else default
            values[key] = _build(check, sub, f"{dotted}.", parent, problems, valid)
            ok = ok and values[key] is not None
        elif key in raw:
            try:
                values[key] = valid[dotted] = check(raw[key], dotted)
            except BadValue as bad:
                problems.append(f"{dotted} {raw[key]!r} {bad}")
                ok = False
        elif default is MISSING:
            problems.append(f"{dotted}: missing; it is required, set it in the YAML or as {dotted}=...")
            ok = False
        else:
            values[key] = valid[dotted] = default
    return cls(**values) if ok else None


# ---- overrides ------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """An override's value as YAML (``0.1``, ``true``, ``null``, ``{a: 1}``); unparsable: the raw text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _merge(target: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and isinstance(target.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(target[key], sub_key, sub_value)
    else:
        target[key] = value


def _apply_override(raw: dict[str, Any], override: str) -> str | None:
    """Set ``a.b=value`` in ``raw`` (in place); return a problem line when it is malformed."""
    dotted, sep, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts):
        return f"override {override!r}: expected key=value, e.g. search.target_ratio=0.1"
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            return f"override {override!r}: {prefix} is a value ({child!r}), not a section; set {prefix}=... instead"
        node = child
    _merge(node, parts[-1], _parse_value(text))
    return None
