"""The architecture itself, read from the import graph with ``ast`` (docs/ARCHITECTURE.md).

- ``search_spaces`` imports neither torch, ray nor transformers (it is instant and pure);
- ``actors`` imports nothing from ``orchestrator`` or ``cluster`` (a replica owns nothing else);
- no two modules import each other, directly or in a circle (imports inside functions count);
- no module but the run directory's owner (``orchestrator/rundir.py``) names ``path.json``.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("search_spaces", "actors", "cluster", "orchestrator")
OWNER_OF_PATH_JSON = "orchestrator.rundir"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool) -> set[str]:
    """Every module ``name`` imports, anywhere in its body, relative imports resolved."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x`: submodule x
    return found


def graph(sources: dict[str, str], packages: set[str]) -> dict[str, set[str]]:
    """Module -> the product modules it imports (names that are not modules, e.g. classes, dropped)."""
    return {name: {m for m in imports_of(name, src, name in packages) if m in sources and m != name}
            for name, src in sources.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(sources: dict[str, str], packages: set[str]) -> list[str]:
    found = []
    for name, src in sources.items():
        imported = imports_of(name, src, name in packages)
        top = {m.split(".")[0] for m in imported}
        if name.split(".")[0] == "search_spaces" and (bad := top & {"torch", "ray", "transformers"}):
            found.append(f"{name} imports {', '.join(sorted(bad))}")
        if name.split(".")[0] == "actors" and (bad := top & {"orchestrator", "cluster"}):
            found.append(f"{name} imports {', '.join(sorted(bad))}")
        if name != OWNER_OF_PATH_JSON and any(isinstance(n, ast.Constant) and n.value == "path.json"
                                              for n in ast.walk(ast.parse(src))):
            found.append(f"{name} names path.json (only {OWNER_OF_PATH_JSON} may)")
    found += [f"import circle: {' <-> '.join(c)}" for c in cycles(graph(sources, packages))]
    return found


def _packages(sources: dict[str, str]) -> set[str]:
    return {module_name(p) for package in PACKAGES for p in (REPO / package).rglob("__init__.py")} & set(sources)


def test_the_product_keeps_its_layers():
    sources = product_sources()
    assert len(sources) > 60  # the walk found the product
    assert violations(sources, _packages(sources)) == []


def test_each_rule_catches_a_planted_break():
    sources = product_sources()
    planted = {
        **sources,
        "search_spaces.leak": "import torch\n",
        "actors.upward": "def f():\n    from orchestrator.cache import EvalCache\n",
        "orchestrator.writer": "from pathlib import Path\nPath('runs/x', 'path.json').write_text('{}')\n",
        # a circle through a function-level import: storage -> campaign -> storage
        "orchestrator.storage": sources["orchestrator.storage"] + "\ndef _late():\n    from .campaign import Campaign\n",
    }
    found = violations(planted, _packages(sources))
    assert "search_spaces.leak imports torch" in found
    assert "actors.upward imports orchestrator" in found
    assert "orchestrator.writer names path.json (only orchestrator.rundir may)" in found
    assert any(f.startswith("import circle:") and "orchestrator.campaign" in f and "orchestrator.storage" in f
               for f in found)
