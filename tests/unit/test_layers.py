"""The package's import graph, read from the source (ast): the layers import what their role
allows, and nothing in the library imports the job plumbing.

    engine   no Ray, no boto3, no config: runs on a bare GPU machine and in the benchmarks
    config   no torch, no Ray: a config is checked in milliseconds, before anything heavy loads
    cli      the jobs' plumbing: imported by jobs/ and bench/ only, and as light as config
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "simpsons"


def _imports(path: Path, top_level_only: bool = True) -> list[tuple[str, ast.stmt, bool]]:
    """(module imported, statement, whether it sits in a function) for each import in `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, child, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                if child.module == "simpsons":
                    found.extend((f"simpsons.{alias.name}", child, in_function) for alias in child.names)
                else:
                    found.append((child.module, child, in_function))
            if not isinstance(child, ast.If) or not _is_type_checking(child):
                visit(child, nested)

    visit(tree, False)
    return [item for item in found if not (top_level_only and item[2])]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def closure(module: str) -> set[str]:
    """Every top-level package that importing `module` (simpsons.x) loads, following the package's
    own module-level imports."""
    seen, todo, outside = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = PACKAGE / f"{name.split('.', 1)[1].replace('.', '/')}.py"
        if not path.exists():
            continue
        for imported, _, _ in _imports(path):
            if imported.startswith("simpsons."):
                todo.append(imported)
            elif imported != "simpsons":
                outside.add(imported.split(".")[0])
    return outside


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("simpsons.engine", {"ray", "boto3", "botocore", "pyarrow"}),
        ("simpsons.config", {"torch", "torchvision", "ray", "boto3", "pyarrow"}),
        ("simpsons.cli", {"torch", "torchvision", "ray", "boto3", "pyarrow"}),
    ],
)
def test_each_layer_loads_only_what_its_role_allows(module, forbidden):
    assert not closure(module) & forbidden, f"{module} loads {sorted(closure(module) & forbidden)}"


def test_the_engine_takes_no_config():
    assert not any(name.startswith("simpsons.config") for name, _, _ in _imports(PACKAGE / "engine.py", False))


def test_nothing_in_the_library_imports_the_cli():
    users = [
        path.name for path in PACKAGE.glob("*.py") if any(n == "simpsons.cli" for n, _, _ in _imports(path, False))
    ]
    assert users == [], f"the library imports simpsons.cli in {users}"


def test_the_library_imports_itself_at_module_level():
    # A function-local import of the package hides a cycle or a heavy import; where one is needed,
    # a comment on its line says why.
    lines = {}
    for path in PACKAGE.glob("*.py"):
        source = path.read_text().splitlines()
        for name, node, in_function in _imports(path, False):
            if in_function and name.startswith("simpsons") and "#" not in source[node.lineno - 1]:
                lines[f"{path.name}:{node.lineno}"] = name
    assert lines == {}, f"function-local imports of the package without a reason: {lines}"


def test_the_graph_reader_sees_a_heavy_import():
    # The checks above pass on an empty graph too: the reader must find what is there.
    assert {"torch", "ray"} <= closure("simpsons.driver")
