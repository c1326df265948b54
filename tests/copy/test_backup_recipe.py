"""The README's incremental-backup recipe (issue 15): examples/incremental_backup.py,
included verbatim in README.md, run against qemu-nbd exporting a real persistent dirty
bitmap made with qemu-img and qemu-io."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.peers import QemuNbd

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "incremental_backup.py"
KiB, MiB = 1024, 1024 * 1024
GRANULARITY = 64 * KiB  # qcow2's default dirty-bitmap granularity
# (pattern, offset, length) written after the bitmap was added
WRITES = [(0x22, 1 * MiB, 64 * KiB), (0x33, 5 * MiB + 64 * KiB, 192 * KiB),
          (0x44, 10 * MiB + 8 * KiB, 4 * KiB), (0x55, 16 * MiB - 64 * KiB, 64 * KiB)]


def test_readme_includes_the_recipe_verbatim():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- examples/incremental_backup\.py -->\n```python\n(.*?)```",
                      readme, re.S)
    assert block is not None, "README.md lost the recipe block"
    assert block.group(1) == RECIPE.read_text()


def qemu_io(image: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    subprocess.run([*args, str(image)], check=True, capture_output=True, timeout=60)


def expected_dirty() -> list[tuple[int, int]]:
    """The writes, widened to the bitmap's granularity, adjacent ones merged."""
    ranges: list[tuple[int, int]] = []
    for _, offset, length in sorted(WRITES, key=lambda w: w[1]):
        start = offset - offset % GRANULARITY
        end = -(-(offset + length) // GRANULARITY) * GRANULARITY
        if ranges and ranges[-1][0] + ranges[-1][1] >= start:
            start = ranges.pop()[0]
        ranges.append((start, end - start))
    return ranges


def test_incremental_backup_copies_exactly_the_dirty_ranges(tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"],
                   check=True, timeout=60)
    qemu_io(image, "write -P 0x11 0 16M")  # the last full backup's data
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True, timeout=60)
    qemu_io(image, *(f"write -P {p:#x} {o} {n}" for p, o, n in WRITES))
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True,
                   timeout=60)
    disk = raw.read_bytes()
    backup = tmp_path / "backup.img"

    with QemuNbd(tmp_path, image, "-B", "b0", fmt="qcow2") as server:
        run = subprocess.run([sys.executable, str(RECIPE), server.uri(), "b0", str(backup)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    dirty = expected_dirty()
    total = sum(n for _, n in dirty)
    assert run.stderr.rstrip().endswith(f"{total} of {total} dirty bytes copied (100%)")
    assert run.stdout.strip() == f"{len(dirty)} dirty ranges, {total} bytes -> {backup}"

    copied = backup.read_bytes()
    assert len(copied) == len(disk) == 16 * MiB
    expected = bytearray(len(disk))  # holes where nothing is dirty
    for offset, length in dirty:
        expected[offset:offset + length] = disk[offset:offset + length]
    assert copied == expected
    # The dirty ranges hold the new writes and, within the same granule, old data.
    assert copied[1 * MiB:1 * MiB + 64 * KiB] == b"\x22" * 64 * KiB
    assert copied[10 * MiB:10 * MiB + 8 * KiB] == b"\x11" * 8 * KiB
    assert copied[2 * MiB:3 * MiB] == bytes(MiB)  # clean: not copied
