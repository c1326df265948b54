"""``blockdrv info/list/map/copy`` next to nbdinfo and nbdcopy: what their users type
gives what those tools give (issue 16).

Each test runs the command and the libnbd tool as subprocesses (with timeouts) against
the same real server on a private socket, and compares their output and exit status.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import blockdrv
from support.images import patterned_image, sha256
from support.peers import EmbeddedServer, Nbdkit, QemuNbd, file_server

from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop



def nbdinfo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # --no-content: blockdrv does not run file(1) on the export's first bytes
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60,
                          check=check)


def nbdinfo_text(*args: str) -> list[str]:
    return [line for line in nbdinfo(*args).stdout.splitlines()
            if not line.startswith("\tcontent: ")]


def peers(tmp_path: Path) -> dict[str, object]:
    image = patterned_image(tmp_path / "disk.img", 8 * MiB)
    return {
        "nbdkit": Nbdkit(tmp_path, "memory", "3000"),  # no unit divides it
        "qemu-nbd-read-only": QemuNbd(tmp_path, image, "-r", "-A"),
        "embedded": EmbeddedServer(tmp_path, "--file", str(image), "--read-only",
                                   "--no-multi-conn", "--description", "a disk",
                                   "--no-extended"),  # nbdinfo 1.14 has no extended headers
    }


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd-read-only", "embedded"])
def test_info_prints_what_nbdinfo_prints(kind, tmp_path):
    with peers(tmp_path)[kind] as peer:  # type: ignore[attr-defined]
        uri = peer.uri()
        assert blockdrv("info", uri).stdout.splitlines() == nbdinfo_text("--no-content", uri)
        ours = json.loads(blockdrv("info", "--json", uri).stdout)
        theirs = json.loads(nbdinfo("--json", "--no-content", uri).stdout)
        assert ours.pop("extended") is False  # ours alone: nbdinfo 1.14 cannot ask
        assert ours == theirs  # same fields, values and order (export-size-str "1G" style)
        assert list(ours["exports"][0]) == list(theirs["exports"][0])
        assert blockdrv("info", "--size", uri).stdout == nbdinfo("--size", uri).stdout


QUESTIONS = [("--can", feature) for feature in (
    "connect", "read", "write", "structured-reply", "cache", "df", "fast-zero", "flush",
    "fua", "multi-conn", "trim", "zero", "no-such-feature")] + [
    ("--is", "read-only"), ("--is", "rotational"), ("--is", "tls"),
    ("--can", "FAST_ZERO"), ("--can", "sr"), ("--is", "readonly")]  # nbdinfo's aliases


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd-read-only", "embedded"])
def test_can_and_is_exit_as_nbdinfo_exits(kind, tmp_path):
    with peers(tmp_path)[kind] as peer:  # type: ignore[attr-defined]
        statuses = set()
        for flag, feature in QUESTIONS:
            ours = blockdrv("info", flag, feature, peer.uri(), check=False)
            theirs = nbdinfo(flag, feature, peer.uri(), check=False)
            assert ours.returncode == theirs.returncode, (flag, feature, ours.stderr)
            assert ours.stdout == ""
            statuses.add(ours.returncode)
        assert statuses == {0, 1, 2}  # true, unknown feature, false: all were seen
    # a server that is not there: an error (1), not "false" (2), for both
    gone = f"nbd+unix:///?socket={tmp_path}/gone.sock"
    assert blockdrv("info", "--can", "connect", gone, check=False).returncode == \
        nbdinfo("--can", "connect", gone, check=False).returncode == 1


def test_list_prints_each_export_as_nbdinfo_list(tmp_path):
    with Nbdkit(tmp_path, "--filter=exportname", "memory", "1M", "exportname=a",
                "exportname=b", "exportname-list=explicit",
                "exportdesc=fixed:a disk") as peer:
        uri = peer.uri("a")
        text = blockdrv("list", uri).stdout.splitlines()
        assert text == nbdinfo_text("--list", uri)
        assert 'export="b":' in text and "\tdescription: a disk" in text
        ours = json.loads(blockdrv("list", "--json", uri).stdout)
        assert ours.pop("extended") is False
        assert ours == json.loads(nbdinfo("--list", "--json", uri).stdout)


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "embedded"])
def test_map_and_totals_print_what_nbdinfo_prints(kind, tmp_path):
    image = patterned_image(tmp_path / "disk.img", 32 * MiB)
    with file_server(kind, tmp_path, image) as peer:
        uri = peer.uri()
        for args in (["--map"], ["--map", "--totals"]):
            mine = ["map", *args[1:]]
            assert blockdrv(*mine, uri).stdout == nbdinfo(*args, uri).stdout, args
            assert json.loads(blockdrv(*mine, "--json", uri).stdout) == \
                json.loads(nbdinfo(*args, "--json", uri).stdout), args


def test_wrong_names_say_what_there_is(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 4 * MiB)
    with QemuNbd(tmp_path, image, "-x", "disk") as peer:
        result = blockdrv("info", peer.uri("nope"), check=False)
        assert result.returncode == 1
        assert "no export named 'nope'" in result.stderr
        assert f"blockdrv list {peer.uri()}" in result.stderr
        result = blockdrv("map", "--context", "qemu:dirty-bitmap:b0", peer.uri("disk"),
                          check=False)
        assert result.returncode == 1
        assert "qemu:dirty-bitmap:b0" in result.stderr
        assert "it offers: base:allocation" in result.stderr
    result = blockdrv("info", "nbd://127.0.0.1:1/", check=False)
    assert result.stderr.strip() == "Error: cannot connect to 127.0.0.1:1: Connection refused"


def test_dash_is_standard_input_and_output(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 16 * MiB, seed=7)
    with Nbdkit(tmp_path, "file", str(image)) as source, \
            Nbdkit(subdir(tmp_path, "small"), "memory", "1M") as small:
        out = subprocess.run([*_cmd(), "copy", source.uri(), "-"], capture_output=True,
                             timeout=60, check=True)
        assert out.stdout == image.read_bytes()
        assert not (Path.cwd() / "-").exists()
        copy = tmp_path / "copy.img"
        with open(image, "rb") as stdin:
            subprocess.run([*_cmd(), "copy", "-q", "-", str(copy)], stdin=stdin,
                           timeout=60, check=True)
        assert sha256(copy) == sha256(image)
        # sparse where a whole request (1 MiB) of the input was zeroes
        assert os.stat(copy).st_blocks * 512 < 12 * MiB
        with open(image, "rb") as stdin:  # 16 MiB do not fit in 1 MiB
            result = subprocess.run([*_cmd(), "copy", "-", small.uri()], stdin=stdin,
                                    capture_output=True, text=True, timeout=60)
        assert result.returncode == 1
        assert result.stderr.strip().endswith(f"is larger than {small.uri()} "
                                              f"({MiB} bytes)")


def _cmd() -> list[str]:
    return [sys.executable, "-m", "blockdrv"]


def subdir(tmp_path: Path, name: str) -> Path:
    """A directory of its own for a second server (each keeps its socket there)."""
    path = tmp_path / name
    path.mkdir()
    return path


def test_allocated_no_extents_target_is_zero(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 16 * MiB, seed=9)
    with Nbdkit(tmp_path, "file", str(image)) as source:
        sparse, allocated = tmp_path / "sparse.img", tmp_path / "allocated.img"
        blockdrv("copy", source.uri(), str(sparse))
        blockdrv("copy", "--allocated", source.uri(), str(allocated))
        assert sha256(sparse) == sha256(allocated) == sha256(image)
        assert os.stat(sparse).st_blocks * 512 < 8 * MiB
        assert os.stat(allocated).st_blocks * 512 >= 16 * MiB  # no holes
        plain = tmp_path / "plain.img"
        result = blockdrv("copy", "--no-extents", source.uri(), str(plain))
        assert sha256(plain) == sha256(image)
        assert "16.0 MiB read" in result.stderr  # everything was read
        with Nbdkit(subdir(tmp_path, "target"), "memory", "16M") as target:
            blockdrv("copy", "--target-is-zero", str(image), target.uri())
            back = tmp_path / "back.img"
            blockdrv("copy", target.uri(), str(back))
            assert sha256(back) == sha256(image)


def test_progress_fd_lines_are_nbdcopys(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 48 * MiB, seed=11)
    with Nbdkit(tmp_path, "file", str(image)) as source:
        lines = {}
        for tool, argv in (("blockdrv", [*_cmd(), "copy", "-q"]), ("nbdcopy", ["nbdcopy"])):
            read, write = os.pipe()
            try:
                subprocess.run([*argv, f"--progress={write}", source.uri(),
                                str(tmp_path / f"{tool}.img")],
                               pass_fds=(write,), timeout=60, check=True)
            finally:
                os.close(write)
            with os.fdopen(read) as f:
                lines[tool] = f.read().splitlines()
        for tool, got in lines.items():
            assert got[0] == "0/100" and got[-1] == "100/100", (tool, got)
            assert all(re.fullmatch(r"\d{1,3}/100", line) for line in got), (tool, got)
            numbers = [int(line.split("/")[0]) for line in got]
            assert numbers == sorted(numbers), (tool, got)
        assert len(lines["blockdrv"]) > 2  # it moved in between
        assert sha256(tmp_path / "blockdrv.img") == sha256(tmp_path / "nbdcopy.img")
        result = blockdrv("copy", "--progress=99", source.uri(), "null:", check=False)
        assert result.returncode == 1 and "--progress=99" in result.stderr


def test_copy_summary_shows_data_moved_and_logical_size(tmp_path):
    with Nbdkit(tmp_path, "sparse-random", "64M", "percent=25", "seed=3") as source:
        result = blockdrv("copy", source.uri(), "null:")
        summary = result.stderr.strip()
        assert summary.startswith(f"copied {64 * MiB} bytes (64.0 MiB) in ")
        moved = re.search(r"data moved: ([\d.]+) MiB read", summary)
        assert moved and 4 < float(moved.group(1)) < 32, summary  # about a quarter
