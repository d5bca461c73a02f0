"""Imports point one way: the runtime composes ``alerts`` and the stream core, ``alerts``
depends on the core, and the core on neither.

Read from the source with ``ast``, so imports inside functions count too, and nothing
is imported (a module that pulls in faust would make this test slow and the check moot).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

RUNTIME: frozenset[str] = frozenset(
    {
        "stream.worker",
        "stream.clients",
        "stream.cli",
        "stream.devstack",
        "stream.ops",
        "stream.simulate",
        "alerts.backtest",
        "alerts.cli",
    }
)
"""The modules that compose the others (Kafka clients, processes, command lines)."""

PACKAGES = ("stream", "alerts")


def _modules() -> dict[str, Path]:
    return {
        f"{package}.{path.stem}" if path.stem != "__init__" else package: path
        for package in PACKAGES
        for path in sorted((REPO / package).glob("*.py"))
    }


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (absolute, relative ones resolved)."""
    found: set[str] = set()
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # ``from stream import worker`` imports a module too
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, target: str) -> bool:
    return name == target or name.startswith(target + ".")


def test_the_walk_sees_every_module_and_the_runtime_exists() -> None:
    modules = _modules()
    assert set(modules) >= RUNTIME, RUNTIME - set(modules)
    assert {"stream.windows", "stream.kpis", "alerts.engine"} <= set(modules)


def test_the_core_imports_neither_alerts_nor_the_runtime() -> None:
    wrong = {
        (module, name)
        for module, path in _modules().items()
        if _within(module, "stream") and module not in RUNTIME
        for name in _imports(module, path)
        if _within(name, "alerts") or any(_within(name, r) for r in RUNTIME)
    }
    assert not wrong, sorted(wrong)


def test_alerts_never_import_the_runtime() -> None:
    wrong = {
        (module, name)
        for module, path in _modules().items()
        if _within(module, "alerts") and module not in RUNTIME
        for name in _imports(module, path)
        if any(_within(name, r) for r in RUNTIME)
    }
    assert not wrong, sorted(wrong)


def test_the_walk_catches_what_it_forbids() -> None:
    """The checks above would pass vacuously if the walk found no imports."""
    modules = _modules()
    assert "alerts.rules" in _imports("stream.worker", modules["stream.worker"])
    assert "stream.simulate" in _imports("stream.cli", modules["stream.cli"])  # in a function
    assert "stream.segments" in _imports("alerts.engine", modules["alerts.engine"])
