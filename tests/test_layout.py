"""The library's import rules: ``vlp_core`` (both halves) and ``stores`` never import Prefect or ``flows``;
only ``flows`` orchestrates."""

from __future__ import annotations

import ast

import pytest

from vlp_core.paths import REPO_ROOT


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ["vlp_core", "stores"])
def test_library_never_imports_the_orchestrator(package):
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(REPO_ROOT)): sorted(_imports(f) & {"prefect", "flows"}) for f in files}
    assert not {f: b for f, b in bad.items() if b}
