"""Smoke tests of the scripts in scripts/ (short forms; the real runs are manual)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.interop


def test_bench_server_smoke(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_server.py"), "--size", "8M",
                    "--runs", "1", "--json", str(out)], check=True, timeout=120,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["mib_s"]) == {"embedded", "nbdkit"}
    assert result["ratio"] > 0


def test_reconnect_recovery_smoke(tmp_path):
    out = tmp_path / "recovery.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "reconnect_recovery.py"),
                    "--runs", "1", "--outage", "1.2", "--json", str(out)], check=True,
                   timeout=120, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result) == {"blockdrv", "blockdrv-fast-retry", "qemu-io"}
    assert all(len(times) == 1 and times[0] >= 0 for times in result.values())
