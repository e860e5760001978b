"""The package layout reads as the pipeline: no module imports a later stage, nothing imports the CLI.

Every import is checked, the lazy ones inside functions included, by reading the
source (an import cycle hidden behind a function-level import still counts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "layerselect"

# docs/architecture.md draws the same map.
STAGE = {
    # foundations: shared by every stage
    "errors": 0, "_io": 0, "_progress": 0, "_running": 0, "_dist": 0, "arch": 0, "loss": 0,
    "texts": 0, "models": 0, "resources": 0, "precision": 0, "_version": 0,
    "stats": 1,
    "selection": 2,
    "selective_ffn": 3,
    "data": 4, "train": 4,
    "distributed": 5, "eval": 5,
    "plots": 6, "representations": 6,
    "demo": 7,
    "__init__": 8,
    "cli": 9, "commands": 9, "__main__": 9,
}


def _imports(path: Path, source: str | None = None) -> list[tuple[str, int]]:
    """(top-level unit inside layerselect, line) for every import in ``path`` (or ``source`` as if there)."""
    package = list(path.relative_to(ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = base + (node.module.split(".") if node.module else [])
            # `from .. import name` at the root: a unit if `name` is one, else the package root itself
            units = [target[0]] if target else [a.name if a.name in STAGE else "__init__" for a in node.names]
            found += [(u, node.lineno) for u in units]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerselect"):
            parts = node.module.split(".")
            found += [(parts[1], node.lineno)] if len(parts) > 1 else [
                (a.name if a.name in STAGE else "__init__", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "layerselect" and len(parts) > 1:
                    found.append((parts[1], node.lineno))
    return found


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_stage():
    units = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in MODULES}
    assert units <= set(STAGE), f"add {sorted(units - set(STAGE))} to STAGE and docs/architecture.md"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_later_stage(path):
    unit = path.relative_to(ROOT).parts[0].removesuffix(".py")
    later = [(u, line) for u, line in _imports(path)
             if u != unit and u in STAGE and STAGE[u] > STAGE[unit]]
    assert not later, f"{path.relative_to(ROOT)} (stage {STAGE[unit]}) imports later stages: {later}"


def test_the_checker_sees_lazy_and_relative_imports():
    # distributed.py imports selective_ffn only inside shard_slam_model
    assert "selective_ffn" in [u for u, _ in _imports(ROOT / "distributed.py")]
    assert "stats" in [u for u, _ in _imports(ROOT / "selection" / "msd.py")]  # from ..stats import
    assert "errors" in [u for u, _ in _imports(ROOT / "stats" / "value.py")]


def test_the_checker_sees_imports_of_the_package_root():
    # `from .. import __version__` runs the package root, which imports every stage
    source = "from .. import __version__\nfrom .. import errors\nfrom layerselect import select\n"
    assert [u for u, _ in _imports(ROOT / "stats" / "files.py", source)] == ["__init__", "errors", "__init__"]
