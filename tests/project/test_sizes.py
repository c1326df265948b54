"""One job per module, kept small where the reasoning is hardest: in the driver
(``blockdrv/nbd``) and the server (``blockdrv/server``) no module is over 500 lines and no
function over 60,
its docstring not counted (DESIGN §2)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ["blockdrv/nbd", "blockdrv/server"]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def too_long(folders: list[str] = FOLDERS) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).glob("*.py")):
            text = path.read_text()
            name = path.relative_to(ROOT)
            if text.count("\n") > MAX_MODULE_LINES:
                found.append(f"{name}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    first = node.body[0]
                    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                            and isinstance(first.value.value, str)):  # the docstring
                        length -= first.end_lineno - first.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    return found


def test_driver_and_server_modules_and_functions_are_small():
    assert too_long() == []
