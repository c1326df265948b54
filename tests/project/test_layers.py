"""The package's layers (DESIGN §2) as a test: every blockdrv import, at module level or
inside a function, points down the order below, and nothing imports in a circle.

protocol < io < block < nbd < server, copy, the facades' bridge < aio, sync < bench <
cli, fuzz.  ``util`` (units, task groups, click types) and ``protocol`` import nothing
of ours.  bench sits above aio and sync because its asyncio engine drives
:mod:`blockdrv.aio`, as a user's asyncio code would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "blockdrv"

LAYERS: list[set[str]] = [
    {"util"},
    {"protocol"},
    {"io"},
    {"block"},
    {"nbd"},
    {"server", "copy", "_bridge", ""},  # "" is blockdrv/__init__.py, the public names
    {"aio", "sync"},
    {"bench"},
    {"cli", "fuzz"},
    {"__main__"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}
IMPORTS_NOTHING_OF_OURS = {"util", "protocol"}


def part_of(module: str) -> str:
    """``blockdrv.nbd.device`` -> ``nbd``; ``blockdrv`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(module: str, path: Path) -> set[str]:
    """The blockdrv modules ``module`` imports anywhere (functions, TYPE_CHECKING too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "blockdrv"}


def against_the_layers(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up, sideways into another part of the same layer, or out
    of a part that imports nothing of ours."""
    wrong = []
    for module, imported in sorted(graph.items()):
        here = part_of(module)
        for target in sorted(imported):
            there = part_of(target)
            if there == here and here != "":
                continue
            if here in IMPORTS_NOTHING_OF_OURS or RANK[there] >= RANK[here]:
                wrong.append(f"{module} imports {target}")
    return wrong


def graph_of_the_package() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for module, path in known.items():
        graph[module] = {name if name in known else name.rpartition(".")[0]
                         for name in imports_of(module, path)}
        graph[module] = {name for name in graph[module] if name in known and name != module}
    return graph


def test_every_part_of_the_package_has_a_layer():
    assert {part_of(module) for module in modules()} <= set(RANK)


def test_no_import_runs_against_the_layers():
    assert against_the_layers(graph_of_the_package()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"blockdrv.server.upstream": {"blockdrv.cli.main"}},
     ["blockdrv.server.upstream imports blockdrv.cli.main"]),
    ({"blockdrv.copy.endpoints": {"blockdrv.server.backends"}},
     ["blockdrv.copy.endpoints imports blockdrv.server.backends"]),
    ({"blockdrv.protocol.wire": {"blockdrv.util.units"}},
     ["blockdrv.protocol.wire imports blockdrv.util.units"]),
    ({"blockdrv.fuzz.cli": {"blockdrv.cli.main"}}, ["blockdrv.fuzz.cli imports blockdrv.cli.main"]),
    ({"blockdrv.nbd.device": {"blockdrv.nbd.dispatch", "blockdrv.block.node"}}, []),
])
def test_the_layer_check_finds_what_the_old_tree_had(graph, expected):
    """The imports issue 21 found (a server module on the command's tools, copy on the
    server, fuzz on the command) are what the check reports."""
    assert against_the_layers(graph) == expected


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
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
    """Counting imports inside functions and under TYPE_CHECKING too (the fuzzer's
    injector once imported its runner there)."""
    graph = graph_of_the_package()
    for module in graph:  # a package's __init__ importing its own modules is no cycle
        if (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists():
            graph[module] = {m for m in graph[module] if not m.startswith(module + ".")}
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
