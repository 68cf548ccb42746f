"""The code passes the project's lint and format check (`[tool.ruff]` in pyproject.toml; `make lint`), and
every package it imports is declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(command):
    done = subprocess.run([str(RUFF), *command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ruff {' '.join(command)} (fix with `make format`):\n{done.stdout}{done.stderr}"


def _third_party_imports(folders: list[str]) -> dict[str, set[str]]:
    """Top-level module -> the files that import it (top-level and function-local imports alike),
    leaving out the standard library and this project's own modules."""
    own = {"simpsons"} | {p.stem for folder in folders for p in (REPO / folder).glob("*.py")}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - own - set(sys.stdlib_module_names):
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _dist(requirement: str) -> str:
    """'ray[default,train]>=2.60' -> 'ray'; names compared as PEP 503 normalises them."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def test_every_package_the_code_imports_is_declared():
    """A module imported by simpsons/ or jobs/ comes from a distribution in pyproject.toml's
    dependencies, or, for an optional feature, in one of its extras other than dev (mlflow)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_dist(r) for r in project["dependencies"]}
    optional = {_dist(r) for extra, reqs in project["optional-dependencies"].items() if extra != "dev" for r in reqs}
    providers = importlib.metadata.packages_distributions()  # module -> the installed distributions with it
    missing = []
    for module, files in sorted(_third_party_imports(["simpsons", "jobs"]).items()):
        dists = {_dist(d) for d in providers.get(module, [])}
        if not dists & (declared | optional):
            missing.append(
                f"{module} (from {', '.join(sorted(dists)) or 'no installed distribution'}; imported by {', '.join(sorted(files))})"
            )
    assert not missing, "Imported but not declared in pyproject.toml's dependencies: " + "; ".join(missing)
