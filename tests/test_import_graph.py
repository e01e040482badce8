"""No import circle inside mfr_ray, counting every import statement: module level, inside functions
(lazy) and under TYPE_CHECKING. A lazy circle works at run time but couples two modules a reader cannot
understand one without the other; this test names the circle so it is broken where it is made."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

import mfr_ray

ALLOWED_CYCLES: set[frozenset[str]] = set()  # none: every import circle is a failure


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    root = package_dir.parent
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name an import statement anywhere in the file asks for (`from a import b` -> a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the longest known prefix of each imported name; the
    parent packages Python also runs are not edges, or every re-exporting __init__ would be a circle)."""
    modules = module_files(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imported in imported_names(name, path):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                graph[name].add(imported)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components of more than one module, i.e. the sets of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while (top := stack.pop()) != node:
                component.add(top)
            if component:
                components.append(component | {node})

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def one_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest circle through the component's first module, as `a -> b -> a`, for the failure message."""
    start = min(component)
    came_from = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no circle through {start}")


def test_mfr_ray_has_no_import_circle():
    graph = import_graph(Path(mfr_ray.__file__).parent)
    assert len(graph) > 100 and "mfr_ray.evaluation.runner" in graph["mfr_ray.cli.evaluate"]
    circles = [c for c in strongly_connected(graph) if frozenset(c) not in ALLOWED_CYCLES]
    assert not circles, "import circles: " + "; ".join(" -> ".join(one_cycle(graph, c)) for c in circles)


@pytest.mark.parametrize("where", ["lazy", "type_checking", "relative"])
def test_a_circle_through_any_kind_of_import_is_found(tmp_path, where):
    """The finder itself: a circle closed by a lazy, a TYPE_CHECKING or a relative import is named."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("from pkg.sub.b import thing\n")
    closing = {
        "lazy": "def f():\n    import pkg.sub.a\n",
        "type_checking": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import a\n",
        "relative": "from .a import name\n",
    }[where]
    (package / "sub" / "b.py").write_text("thing = 1\n" + closing)
    (package / "sub" / "c.py").write_text("import pkg.sub.b\n")
    graph = import_graph(package)
    (component,) = strongly_connected(graph)
    assert component == {"pkg.sub.a", "pkg.sub.b"}
    assert one_cycle(graph, component) == ["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]
