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
