"""Smoke tests of the scripts in scripts/ (short forms; the real runs are manual)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

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
    result = run_script("bench_server.py", tmp_path, "--size", "8M", "--runs", "1",
                        "--count", "256")
    servers = {"embedded", "nbdkit", "proxy"}
    volume_mib = {"nbdcopy": 8, "qemu-img bench": 256 * 64 / 1024}
    assert set(result["clients"]) == set(result["rates"]) == set(volume_mib)
    for client, by_server in result["clients"].items():
        assert set(by_server) == servers and all(len(t) == 1 for t in by_server.values())
        rates = result["rates"][client]
        for server in servers:  # MiB/s is the client's volume over its (median) time
            assert rates[server] == pytest.approx(volume_mib[client] / by_server[server][0])
        assert result["ratios"][client] == pytest.approx(rates["embedded"] / rates["nbdkit"])
    # The top-level figures are nbdcopy's.
    assert result["size"] == 8 << 20
    assert result["runs"] == result["clients"]["nbdcopy"]
    assert result["mib_s"] == result["rates"]["nbdcopy"]
    assert result["ratio"] == result["ratios"]["nbdcopy"] > 0
    assert result["proxy_ratio"] > 0


def test_reconnect_recovery_smoke(tmp_path):
    result = run_script("reconnect_recovery.py", tmp_path, "--runs", "1", "--outage", "1.2")
    assert set(result) == {"blockdrv", "blockdrv-fast-retry", "qemu-io"}
    # From the restarted server accepting to the waiting read completing: after the
    # restart (a read cannot complete without the server), within the 30 s reconnect
    # delay (past it the read would have failed, and the script with it).
    assert all(len(times) == 1 and 0 < times[0] < 30 for times in result.values())


def test_bench_quick_writes_the_promised_json(tmp_path):
    result = run_script("bench", tmp_path, "--quick", "--repeat", "1", timeout=300)
    workloads = {"read-4k-qd1", "read-4k-qd64", "read-64k-qd16", "write-64k-qd16",
                 "read-1m-qd8", "write-1m-qd8", "mixed-1m-qd16"}
    rows = {(row["workload"], row["client"]): row for row in result["results"]}
    assert set(rows) == {(w, c) for w in workloads for c in ("blockdrv", "libnbd", "qemu")
                         if (w, c) != ("mixed-1m-qd16", "qemu")}
    request_mib = {"4k": 4 / 1024, "64k": 64 / 1024, "1m": 1}
    for (workload, _client), row in rows.items():
        # Every request moves the workload's request size: MiB/s = IOPS x request size.
        size = request_mib[workload.split("-")[1]]
        assert row["iops"] > 0 and row["mib_s"] == pytest.approx(row["iops"] * size)
        assert row["cpu_s_per_gib"] > 0  # moving data costs some CPU
    assert set(result["ratios"]) == workloads
    for workload, ratios in result["ratios"].items():  # blockdrv's MiB/s over the peer's
        mine = rows[workload, "blockdrv"]["mib_s"]
        assert ratios["libnbd"] == pytest.approx(mine / rows[workload, "libnbd"]["mib_s"])
        if workload == "mixed-1m-qd16":
            assert ratios["qemu"] is None  # qemu-img bench cannot mix reads and writes
        else:
            assert ratios["qemu"] == pytest.approx(mine / rows[workload, "qemu"]["mib_s"])
    assert 0 < result["drain"]["p50_s"] <= result["drain"]["max_s"]


def test_bench_copy_smoke(tmp_path):
    result = run_script("bench_copy.py", tmp_path, "--size", "64M", "--runs", "1")
    assert result["identical"] is True
    assert result["sha256"]["blockdrv"] == result["sha256"]["nbdcopy"]
    assert set(result["results"]) == {f"{tool}->{dest}" for tool in ("blockdrv", "nbdcopy")
                                      for dest in ("null", "file", "nbd")}
    startup = result["blockdrv_startup_s"]
    assert startup > 0
    for name, row in result["results"].items():  # MiB/s of the source size
        assert row["mib_s"] == pytest.approx(64 / row["seconds"])
        if name.startswith("blockdrv->"):  # issue 16's target: 1.5 x nbdcopy + start-up
            theirs = result["results"]["nbdcopy->" + name.split("->")[1]]["seconds"]
            assert row["target_s"] == pytest.approx(1.5 * theirs + startup)
        else:
            assert "target_s" not in row
