"""Safe defaults, checked over the whole product by reading its source (no code runs).

No pickle and no unsafe loaders for anything rayprune reads back, ``trust_remote_code`` never on,
Ray's authentication never switched off, no server bound to every interface.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("orchestrator", "actors", "cluster", "search_spaces")
UNSAFE_MODULES = {"pickle", "cloudpickle", "dill", "marshal", "shelve"}
UNSAFE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                ("Tuner", "restore"), ("tune.Tuner", "restore")}


def product_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def violations(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            owner, _, attr = func.rpartition(".")
            if (owner, attr) in UNSAFE_CALLS or func in ("eval", "exec"):
                found.append(f"{name}:{node.lineno} calls {func}")
            for kw in node.keywords:
                if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{name}:{node.lineno} passes trust_remote_code other than False")
    return found


def test_the_checker_catches_what_it_looks_for():
    planted = ("import pickle\nimport torch\nx = torch.load('w.bin')\nfrom transformers import AutoModel\n"
               "AutoModel.from_pretrained('m', trust_remote_code=True)\nimport yaml\nyaml.load(open('c'))\n")
    assert len(violations(planted, "planted.py")) == 4


@pytest.mark.parametrize("path", product_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_unsafe_loading(path):
    assert violations(path.read_text(), str(path.relative_to(REPO))) == []


def test_ray_authentication_is_never_switched_off():
    disabled = re.compile(r"RAY_AUTH_MODE\W{0,6}disabled", re.IGNORECASE)
    texts = [*product_files(), REPO / "Makefile", REPO / "README.md", *(REPO / "cluster").glob("*.yaml"),
             *(REPO / "configs").glob("*.yaml"), REPO / ".ci" / "run"]
    assert [str(p.relative_to(REPO)) for p in texts if disabled.search(p.read_text())] == []


def test_no_server_is_bound_to_every_interface():
    texts = [*product_files(), *(REPO / "cluster").glob("*.yaml")]
    assert [str(p.relative_to(REPO)) for p in texts if "0.0.0.0" in p.read_text()] == []
