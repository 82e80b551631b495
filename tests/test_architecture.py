"""The layers of docs/architecture.md import only what they may: every import of every module
of fastdpl (top-level and inside functions), read from the source with ast."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastdpl"
SHARED = {"config", "atomic", "dtypes", "profiling"}
# layer -> the top-level fastdpl modules/packages it may import (besides itself)
ALLOWED = {
    "ops": {"kernels"},
    "kernels": set(),  # below the op's registration: the kernels import nothing of fastdpl's
    "core": {"ops"} | SHARED,
    "adapters": {"ops", "profiling"},
}
NEVER_BELOW_PIPELINE = {"pipeline", "cli"}
PIPELINE = {"pipeline", "data", "bench", "cli"}


def _imports(path: Path):
    """Top-level fastdpl names imported by a module: 'ops' for fastdpl.ops / ..ops / .ops."""
    module_parts = path.relative_to(ROOT).with_suffix("").parts  # ("fastdpl", "core", "bank")
    package = module_parts[:-1] if path.name != "__init__.py" else module_parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ((node.module,) if node.module else ()))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "fastdpl" and len(parts) > 1:
                found.add(parts[1])
    return found


def _layer(path: Path) -> str:
    if path.parent.name == "kernels":
        return "kernels"
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_scan_sees_imports():
    assert _imports(PACKAGE / "core" / "bank.py") >= {"config", "ops"}
    assert "kernels" in _imports(PACKAGE / "ops" / "library.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_layers_import_only_what_they_may(path):
    layer = _layer(path)
    imported = _imports(path) - {layer}
    if layer in ALLOWED:
        assert imported <= ALLOWED[layer], f"{layer} imports {sorted(imported - ALLOWED[layer])}"
    if layer not in PIPELINE:
        assert not imported & NEVER_BELOW_PIPELINE, f"{layer} imports {sorted(imported & NEVER_BELOW_PIPELINE)}"
    assert "cli" not in imported or layer == "cli"
