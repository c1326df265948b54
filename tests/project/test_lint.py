"""The code stays typed (mypy --strict) and ruff-clean: CI runs both through pytest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_is_clean():
    out = subprocess.run([sys.executable, "-m", "mypy", "blockdrv"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "blockdrv", "tests",
                          "scripts"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


PUBLIC_MODULES = ["blockdrv", "blockdrv.sync", "blockdrv.io.tls", "blockdrv.copy", "blockdrv.nbd",
                  "blockdrv.block", "blockdrv.server", "blockdrv.protocol",
                  "blockdrv.bench.engine", "blockdrv.nbd.query", "blockdrv.nbd.multiconn",
                  "blockdrv.fuzz", "blockdrv.aio"]


def _source_of(name: str):
    """The module ``name`` loaded from its ``.py`` source: mypyc keeps no docstrings,
    so a compiled module is checked in the source it is compiled from (what help()
    shows under BLOCKDRV_PURE_PYTHON=1)."""
    import importlib.util
    import sys

    fullname = name + "_source"
    if fullname not in sys.modules:
        path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
        spec = importlib.util.spec_from_file_location(fullname, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[fullname] = module
        spec.loader.exec_module(module)
    return sys.modules[fullname]


def _undocumented() -> list[str]:
    import importlib
    import inspect

    from blockdrv.util import core

    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        if name in core.COMPILED:
            module = _source_of(name)
            name = module.__name__
        if not inspect.getdoc(module):
            missing.append(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            exported = [n for n in vars(module) if not n.startswith("_")
                        and getattr(vars(module)[n], "__module__", "") == name]
        for public in exported:
            obj = getattr(module, public)
            if getattr(obj, "__module__", None) in core.COMPILED:  # re-exported
                obj = getattr(_source_of(obj.__module__), public)
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
