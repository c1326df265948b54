"""Smoke tests of the scripts in scripts/ (short forms; the real runs are manual)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.interop


def run_script(script: str, tmp_path: Path, *args: str, timeout: float = 120) -> dict:
    """Run a script with ``--json FILE`` (and ``args``); returns what it wrote."""
    out = tmp_path / "out.json"
    argv = ([str(ROOT / "scripts" / script)] if "." not in script
            else [sys.executable, str(ROOT / "scripts" / script)])
    subprocess.run(argv + [*args, "--json", str(out)], check=True, timeout=timeout,
                   capture_output=True)
    return json.loads(out.read_text())


def test_bench_server_smoke(tmp_path):
    result = run_script("bench_server.py", tmp_path, "--size", "8M", "--runs", "1")
    assert set(result["mib_s"]) == {"embedded", "nbdkit", "proxy"}
    assert result["ratio"] > 0 and result["proxy_ratio"] > 0


def test_reconnect_recovery_smoke(tmp_path):
    result = run_script("reconnect_recovery.py", tmp_path, "--runs", "1", "--outage", "1.2")
    assert set(result) == {"blockdrv", "blockdrv-fast-retry", "qemu-io"}
    assert all(len(times) == 1 and times[0] >= 0 for times in result.values())


def test_bench_quick_writes_the_promised_json(tmp_path):
    result = run_script("bench", tmp_path, "--quick", "--repeat", "1", timeout=300)
    workloads = {"read-4k-qd1", "read-4k-qd64", "read-64k-qd16", "write-64k-qd16",
                 "read-1m-qd8", "write-1m-qd8", "mixed-1m-qd16"}
    clients = {(row["workload"], row["client"]) for row in result["results"]}
    assert clients == {(w, c) for w in workloads for c in ("blockdrv", "libnbd", "qemu")
                       if (w, c) != ("mixed-1m-qd16", "qemu")}
    for row in result["results"]:
        assert row["iops"] > 0 and row["mib_s"] > 0 and row["cpu_s_per_gib"] >= 0
    assert set(result["ratios"]) == workloads
    assert result["ratios"]["mixed-1m-qd16"]["qemu"] is None
    assert all(r["libnbd"] > 0 for r in result["ratios"].values())
    assert 0 < result["drain"]["p50_s"] <= result["drain"]["max_s"]


def test_bench_copy_smoke(tmp_path):
    result = run_script("bench_copy.py", tmp_path, "--size", "64M", "--runs", "1")
    assert result["identical"] is True
    assert set(result["results"]) == {f"{tool}->{dest}" for tool in ("blockdrv", "nbdcopy")
                                      for dest in ("null", "file", "nbd")}
