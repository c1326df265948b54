"""Run the ``blockdrv`` command as a subprocess (with a timeout, so a hang fails fast)."""

from __future__ import annotations

import subprocess
import sys


def blockdrv(*args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m blockdrv ARGS``; raises on a non-zero status if ``check``."""
    return subprocess.run([sys.executable, "-m", "blockdrv", *args], capture_output=True,
                          text=True, timeout=timeout, check=check)
