"""The library's shape: no import cycles between its modules, no module importing another module's private names.

Both are read from the source (``ast``), so function-level (lazy) imports count as much as top-level ones.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = "routertune_lib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of a library module in ``path``."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").split(".")[0] == PACKAGE:
                source = node.module
            else:
                continue
            for a in node.names:
                if f"{source}.{a.name}" in modules:  # `from . import moe`: the submodule itself
                    found.append((f"{source}.{a.name}", None, node.lineno))
                else:
                    found.append((source, a.name, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, str | None, int]]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def test_no_import_cycles(graph):
    edges = {m: sorted({target for target, _, _ in imports if target in graph and target != m})
             for m, imports in graph.items()}
    # a package's __init__ is imported before any of its submodules, so it is no dependency of them
    edges = {m: [t for t in targets if not m.startswith(t + ".")] for m, targets in edges.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in edges[m]:
            if state.get(t) == "open":
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names(graph):
    bad = [f"{m} line {line}: {name} from {target}" for m, imports in graph.items() for target, name, line in imports
           if name is not None and name.startswith("_") and target != m]
    assert not bad, "private names imported across modules (make them public where they belong): " + "; ".join(bad)
