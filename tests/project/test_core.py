"""The compiled core: what is built, how it is chosen, and that it is the one in use."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import blockdrv.nbd.dispatch
from blockdrv.util import core

ROOT = Path(__file__).resolve().parents[2]


def test_the_build_compiles_exactly_the_listed_modules():
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "CORE" for t in node.targets))
    paths = ast.literal_eval(listed)
    assert [p.removesuffix(".py").replace("/", ".") for p in paths] == list(core.COMPILED)
    for path in paths:
        assert (ROOT / path).exists(), path  # the source stays as the reference


def _built() -> str:
    """The core an import without BLOCKDRV_PURE_PYTHON gets: compiled when the build
    left extension modules beside the sources."""
    here = Path(blockdrv.nbd.dispatch.__file__).parent
    return "compiled" if any(here.glob("dispatch.*.so")) else "pure Python"


def test_the_expected_core_is_in_use():
    """CI sets BLOCKDRV_EXPECT_CORE=compiled (.ci/run): a build that silently fell back
    to pure Python fails here; BLOCKDRV_PURE_PYTHON=1 must give the pure core."""
    if core.pure_requested():
        expected = "pure Python"
    else:
        expected = os.environ.get("BLOCKDRV_EXPECT_CORE") or _built()
    assert core.in_use() == expected
    suffix = ".py" if expected == "pure Python" else ".so"
    assert str(blockdrv.nbd.dispatch.__file__).endswith(suffix)


def _run(code: str, pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != core.PURE_ENVIRONMENT}
    if pure is not None:
        env[core.PURE_ENVIRONMENT] = pure
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def test_pure_python_is_forced_by_the_environment_for_every_listed_module():
    code = ("import importlib, blockdrv; from blockdrv.util import core; "
            "print(all(importlib.import_module(m).__file__.endswith('.py') "
            "for m in core.COMPILED), core.in_use())")
    assert _run(code, "1") == "True pure Python"
    assert _run(code, "0").endswith(_built())  # "0" asks for nothing


def test_version_says_which_core():
    out = subprocess.run([sys.executable, "-m", "blockdrv", "--version"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert f"core: {core.in_use()}" in out
