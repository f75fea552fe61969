"""The package's layering, checked by import-linter's contracts (``[importlinter]`` in ``setup.cfg``), and no import
cycle between any two modules (grimp's import graph, imports inside functions included)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    command = shutil.which("lint-imports")
    assert command, "import-linter is not installed (pip install -e '.[test]')"
    result = subprocess.run([command, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    graph = grimp.build_graph("hf_layercollapse", cache_dir=None)
    # a package's __init__ re-exports its submodules: those edges are left out, every other import counts
    packages = {m for m in graph.modules if graph.find_children(m)}
    modules = graph.modules - packages
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    assert sum(map(len, edges.values())) > 50  # the graph is the real one
    assert _cycles(edges) == []
    # and no module reaches up to the package itself (for its __version__, say)
    assert not [m for m in modules if "hf_layercollapse" in graph.find_modules_directly_imported_by(m)]
