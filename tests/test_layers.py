"""Imports point one way: tasks < search < memory < agent < workers < arbor (the CLI)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["tasks", "search", "memory", "agent", "workers", "arbor"]


def _imports(path: Path):
    """(line, top-level package) of every absolute import in a file, function-level imports included."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def test_no_import_points_up_a_layer():
    upward = []
    for rank, package in enumerate(LAYERS):
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, f"layer {package}/ has no modules"
        for path in files:
            for line, top in _imports(path):
                if top in LAYERS and LAYERS.index(top) > rank:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {top} (a layer above {package})")
    assert not upward, "\n".join(upward)


def test_the_walk_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from workers.app import app\n")
    assert list(_imports(module)) == [(2, "workers")]
