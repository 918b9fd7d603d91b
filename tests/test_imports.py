"""The package's import graph: no circles, and imports inside functions only where they keep the
`llamascope` command's start light (tests/test_startup.py checks it does not import PyTorch)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llamascope"
# The command's face imports each subcommand's machinery when that subcommand runs.
LAZY_MODULES = {"llamascope.cli"}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict) -> set[str]:
    """The package's modules an import statement names (`from . import x` names module x)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names]
    found = set()
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            found.add(name)
    return found


def _lazy_exports(package: str, tree: ast.Module) -> set[str]:
    """The submodules a package's `_HOMES` table (exports.lazy_exports) imports on first use."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_HOMES" for t in node.targets):
            return {f"{package}.{home}" for home in ast.literal_eval(node.value).values()}
    return set()


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Every module's imports of the package (at top level and inside functions), and the
    imports of the package's modules made inside functions: (module, function, statement)."""
    modules = _modules()
    graph, inside = {}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, path, node, modules)
        graph[module] |= _lazy_exports(module, tree)
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(module, path, node, modules):
                        inside.append((module, function.name, ast.unparse(node)))
    return graph, inside


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, state, path = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                circles.append(path[path.index(other) :] + [other])
            elif other not in state:
                visit(other)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return circles


def test_the_package_has_no_import_circles():
    graph, _ = _graph()
    assert len(graph) > 30
    assert "llamascope.loading.load" in graph["llamascope.loading"]  # (the lazy exports are edges too)
    assert _circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_modules_import_the_package_at_top_level_except_the_command():
    _, inside = _graph()
    assert [entry for entry in inside if entry[0] not in LAZY_MODULES] == []
    assert any(entry[0] == "llamascope.cli" for entry in inside)  # (the finder sees imports inside functions)
