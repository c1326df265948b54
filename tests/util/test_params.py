"""The click helpers shared by the commands: grouped options."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import click
from click.testing import CliRunner

from blockdrv.util.params import SIZE, option_group

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Window:
    width: int
    title: str


def test_grouped_options_reach_the_command_as_one_object():
    seen = []

    @click.command()
    @option_group("window", Window,
                  click.option("--width", type=SIZE, default="1K"),
                  click.option("--title", default="t"))
    @click.option("--other", default=1)
    def command(window: Window, other: int) -> None:
        seen.append((window, other))

    result = CliRunner().invoke(command, ["--width", "2K", "--other", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [(Window(2048, "t"), 3)]
    help_text = CliRunner().invoke(command, ["--help"]).output
    assert help_text.index("--width") < help_text.index("--title") < \
        help_text.index("--other")  # help order as written


def test_no_command_takes_more_than_a_dozen_parameters():
    """`serve` took 44 before its options were grouped (planted: a 17-parameter
    function is reported)."""
    def wide(source: str) -> list[str]:
        found = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if len(node.args.args) + len(node.args.kwonlyargs) > 16:
                    found.append(node.name)
        return found

    planted = "def f(" + ", ".join(f"a{i}" for i in range(17)) + "): pass"
    assert wide(planted) == ["f"]
    for path in sorted((ROOT / "blockdrv" / "cli").glob("*.py")):
        assert wide(path.read_text()) == [], path
