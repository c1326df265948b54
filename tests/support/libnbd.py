"""Run libnbd (python3-libnbd) code with the system Python, which has the bindings."""

from __future__ import annotations

import json
import subprocess
import textwrap

SYSTEM_PYTHON = "/usr/bin/python3"


def run_libnbd(script: str, *args: str, timeout: float = 60) -> object:
    """Run ``script`` (which may use ``nbd`` and ``sys.argv``) and parse its JSON stdout."""
    code = "import json, sys, nbd\n" + textwrap.dedent(script)
    result = subprocess.run([SYSTEM_PYTHON, "-c", code, *args], capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"libnbd script failed ({result.returncode}):\n{result.stderr}")
    return json.loads(result.stdout)
