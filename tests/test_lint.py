"""The code stays typed (mypy --strict) and ruff-clean: CI runs both through pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean():
    out = subprocess.run([sys.executable, "-m", "mypy", "blockdrv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "blockdrv", "tests",
                          "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


PUBLIC_MODULES = ["blockdrv", "blockdrv.sync", "blockdrv.tls", "blockdrv.tools", "blockdrv.nbd",
                  "blockdrv.block", "blockdrv.server", "blockdrv.protocol",
                  "blockdrv.benchmark", "blockdrv.nbd.query", "blockdrv.nbd.multiconn",
                  "blockdrv.fuzz", "blockdrv.aio"]


def _undocumented() -> list[str]:
    import importlib
    import inspect

    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        if not inspect.getdoc(module):
            missing.append(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            exported = [n for n in vars(module) if not n.startswith("_")
                        and getattr(vars(module)[n], "__module__", "") == name]
        for public in exported:
            obj = getattr(module, public)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.append(f"{name}.{public}")
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(value, property) or inspect.isfunction(value):
                        if not inspect.getdoc(getattr(obj, attr)
                                              if not isinstance(value, property)
                                              else value):
                            missing.append(f"{name}.{public}.{attr}")
    return sorted(set(missing))


def test_every_public_name_has_a_docstring():
    assert _undocumented() == []


def _module_imports() -> dict[str, set[str]]:
    """blockdrv module -> the blockdrv modules it imports at module level (imports inside
    functions and under TYPE_CHECKING do not make a cycle at import time)."""
    import ast

    paths = {}
    for path in (ROOT / "blockdrv").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                for alias in node.names:
                    name = f"{base}.{alias.name}"
                    found.add(name if name in paths else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[module] = {name for name in found if name in paths and name != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported, path + [imported])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_module_imports_itself_back():
    """E.g. server/connection.py and server/server.py: the connection gets a
    ServerConfig and counters, not the server, so neither imports the other."""
    assert _cycle(_module_imports()) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
