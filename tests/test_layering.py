"""The architecture, enforced: each subpackage imports only from the layers below it (docs/architecture.md lists
them in this order), and the engines' libraries appear only in the integrations (and the command line)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvtier

PACKAGE = Path(kvtier.__file__).parent
# Lowest first. A module may import its own package and any listed before it, never one after it.
LAYERS = [
    "errors",
    "config",
    "metrics",
    "tokens",
    "diagnosis",
    "memory",
    "codecs",
    "protocol",
    "client",
    "storage",
    "engine",
    "server",
    "integrations",
    "quality",
    "cli",
]
ENGINE_LIBRARIES = {"vllm", "transformers", "sglang"}
MAY_IMPORT_ENGINE_LIBRARIES = {"integrations", "cli"}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a lazy import is still a dependency)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0].removesuffix(".py")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_subpackage_has_a_layer() -> None:
    assert {layer_of(p) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_nothing_imports_upward(path: Path) -> None:
    own = LAYERS.index(layer_of(path))
    for name in imports_of(path):
        parts = name.split(".")
        if parts[0] == "kvtier" and len(parts) > 1:
            assert LAYERS.index(parts[1]) <= own, f"{path.relative_to(PACKAGE)} imports {name}, a higher layer"
        elif parts[0] == "kvtier":  # the package itself (its version): loaded before any of its modules anyway
            continue
        else:
            assert parts[0] not in ENGINE_LIBRARIES or layer_of(path) in MAY_IMPORT_ENGINE_LIBRARIES, (
                f"{path.relative_to(PACKAGE)} imports {name}: only the integrations may"
            )


def test_test_modules_have_unique_names() -> None:
    """The test folders are not packages (pytest's rootdir imports), so two test files of one name in two folders
    break collection of the whole suite: name them after the module they test, whole."""
    tests = Path(__file__).parent
    names: dict[str, list[str]] = {}
    for path in tests.rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(tests)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
