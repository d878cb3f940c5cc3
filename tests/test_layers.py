"""Dependencies point one way (DESIGN.md): vlm <- analysis, vlm <- pruning <- analysis, and the end-to-end
workflows (pipeline/) above both. Read from the source with ast, so an import inside a function counts too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the top-level packages of this project it must never import
FORBIDDEN = {
    "vlm": ("analysis", "pruning", "pipeline"),
    "pruning": ("analysis", "pipeline"),
    "analysis": ("pipeline",),
}


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `source`, a module of `package`, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                out.append((node.lineno, node.module or ""))
    return out


def test_the_parser_sees_imports_at_any_depth():
    source = "import os\nfrom analysis import shift\n\ndef f():\n    import analysis.derive as d\n    from .schedule import x\n"
    assert imported_modules(source, "pruning") == [(1, "os"), (2, "analysis"), (5, "analysis.derive"),
                                                   (6, "pruning.schedule")]
    assert imported_modules("from ..models import m\n", "vlm.arch") == [(1, "vlm.models")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_its_own(package):
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        package_of_file = ".".join(path.relative_to(REPO).parent.parts)
        for line, module in imported_modules(path.read_text(), package_of_file):
            if module.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, f"{package}/ must not import {list(FORBIDDEN[package])} (DESIGN.md, layers): " + "; ".join(bad)
