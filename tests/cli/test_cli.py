"""The ``blockdrv`` command against real servers and next to nbdinfo/nbdcopy (issue 8).

Each test runs the command as a subprocess (with a timeout, so a hang fails fast)
against nbdkit, qemu-nbd or the embedded server started on a private socket.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from support.cli import blockdrv
from support.images import patterned_image, sha256
from support.peers import SERVER_KINDS, EmbeddedServer, Nbdkit, QemuNbd, file_server, nbdinfo_json

from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_info_matches_nbdinfo(kind, tmp_path):
    image = patterned_image(tmp_path / "disk.img", 16 * MiB)
    with file_server(kind, tmp_path, image) as peer:
        ours = json.loads(blockdrv("info", "--json", peer.uri()).stdout)
        theirs = nbdinfo_json(peer.uri())
        assert ours["protocol"] == theirs["protocol"] and ours["TLS"] == theirs["TLS"]
        mine, their = ours["exports"][0], theirs["exports"][0]
        shared = set(mine) & set(their) - {"export-size-str", "uri"}
        assert {"export-name", "export-size", "can_flush", "can_zero", "can_trim",
                "can_multi_conn", "is_read_only", "contexts"} <= shared
        for key in shared:
            if key == "contexts":
                assert set(their[key]) <= set(mine[key]), key
            else:
                assert mine[key] == their[key], key
        text = blockdrv("info", peer.uri()).stdout
        assert f"export-size: {16 * MiB}" in text and "can_flush: true" in text


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_map_matches_nbdinfo_map(kind, tmp_path):
    image = patterned_image(tmp_path / "disk.img", 32 * MiB)
    with file_server(kind, tmp_path, image) as peer:
        ours = json.loads(blockdrv("map", "--json", peer.uri()).stdout)
        theirs = nbdinfo_json("--map", peer.uri())
        assert [(e["offset"], e["length"], e["type"]) for e in ours] == \
            [(e["offset"], e["length"], e["type"]) for e in theirs]
        assert {e["description"] for e in ours} <= {"data", "hole", "zero", "hole,zero"}
        assert sum(e["length"] for e in ours) == 32 * MiB
        text = blockdrv("map", peer.uri()).stdout.splitlines()
        assert len(text) == len(ours)


def test_map_of_another_context(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 8 * MiB)
    with QemuNbd(tmp_path, image, "-A") as peer:  # -A: qemu:allocation-depth
        ours = json.loads(blockdrv("map", "--json", "--context", "qemu:allocation-depth",
                                   peer.uri()).stdout)
        theirs = nbdinfo_json("--map=qemu:allocation-depth", peer.uri())
        assert [(e["offset"], e["length"], e["type"]) for e in ours] == \
            [(e["offset"], e["length"], e["type"]) for e in theirs]
        result = blockdrv("map", "--context", "qemu:dirty-bitmap:nope", peer.uri(),
                          check=False)
        assert result.returncode != 0 and "qemu:dirty-bitmap:nope" in result.stderr


def test_list_names_every_export(tmp_path):
    with Nbdkit(tmp_path, "--filter=exportname", "memory", "1M", "exportname=a",
                "exportname=b", "exportname-list=explicit") as peer:
        text = blockdrv("list", peer.uri()).stdout.splitlines()
        assert [line for line in text if line.startswith("export=")] == \
            ['export="a":', 'export="b":']
        listed = json.loads(blockdrv("list", "--json", peer.uri()).stdout)["exports"]
        assert [e["export-name"] for e in listed] == ["a", "b"]
        assert listed[0]["uri"].startswith("nbd+unix:///a?socket=")
    with EmbeddedServer(tmp_path, "--memory", "1M", "--export", "disk",
                        "--description", "a disk") as peer:
        assert 'export="disk":\n\tdescription: a disk\n\texport-size: 1048576 (1M)\n' in \
            blockdrv("list", peer.uri("disk")).stdout


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_copy_gives_the_image_nbdcopy_gives(kind, tmp_path):
    image = patterned_image(tmp_path / "disk.img", 48 * MiB, seed=3)
    mine, theirs = tmp_path / "mine.img", tmp_path / "theirs.img"
    with file_server(kind, tmp_path, image,
                     *(["--read-only"] if kind == "embedded" else [])) as peer:
        blockdrv("copy", "--connections", "4", "--requests", "8", "--request-size", "64K",
                 peer.uri(), str(mine))
        subprocess.run(["nbdcopy", peer.uri(), str(theirs)], check=True, timeout=60)
        assert sha256(mine) == sha256(theirs) == sha256(image)
        # nothing was written for holes: the copy is about as sparse as the source
        assert os.stat(mine).st_blocks <= os.stat(image).st_blocks + 2048
        blockdrv("copy", "--quiet", peer.uri(), "null:")


def test_copy_into_an_export_and_between_exports(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 24 * MiB, seed=5)
    with EmbeddedServer(tmp_path, "--memory", "24M") as target, \
            Nbdkit(tmp_path, "memory", "24M") as middle:
        # file -> NBD, with leftovers in the destination that zeroing must clear
        blockdrv("copy", str(tmp_path / "disk.img"), middle.uri())
        subprocess.run(["nbdcopy", "--destination-is-zero", str(image), target.uri()],
                       check=True, timeout=60)
        blockdrv("copy", "--flush", "--requests", "32", middle.uri(), target.uri())
        back = tmp_path / "back.img"
        subprocess.run(["nbdcopy", target.uri(), str(back)], check=True, timeout=60)
        assert sha256(back) == sha256(image)


def test_copy_checks_its_arguments(tmp_path):
    image = patterned_image(tmp_path / "disk.img", 4 * MiB)
    with Nbdkit(tmp_path, "memory", "1M") as small:
        result = blockdrv("copy", str(image), small.uri(), check=False)
        assert result.returncode == 1 and "smaller" in result.stderr
    result = blockdrv("copy", "null:", str(tmp_path / "x"), check=False)
    assert result.returncode != 0 and "only be the destination" in result.stderr
    result = blockdrv("copy", str(tmp_path / "missing.img"), "null:", check=False)
    assert result.returncode != 0 and "missing.img" in result.stderr
    before = sha256(image)
    result = blockdrv("copy", str(image), str(image), check=False)
    assert result.returncode != 0 and "source of this copy" in result.stderr
    assert sha256(image) == before  # not truncated
    result = blockdrv("serve", "--memory", "1M", "--tls-ca", str(image), check=False)
    assert result.returncode == 2 and "without --tls-cert" in result.stderr


def test_errors_are_one_line(tmp_path):
    for args, words in [
        (["info", f"nbd+unix:///?socket={tmp_path}/nobody"], "nobody"),
        (["info", "nbd://127.0.0.1:1/"], "refused"),
        (["map", "http://example.com/"], "URI"),
        (["list", "nbd+unix:///"], "socket"),
    ]:
        result = blockdrv(*args, check=False)
        assert result.returncode != 0, args
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_info_says_when_multi_conn_is_not_offered(tmp_path):
    with EmbeddedServer(tmp_path, "--memory", "1M", "--no-multi-conn") as peer:
        out = json.loads(blockdrv("info", "--json", "--connections", "4",
                                  peer.uri()).stdout)
        assert out["exports"][0]["connections"] == 1
        assert out["exports"][0]["can_multi_conn"] is False
        assert "does not advertise multi-conn" in blockdrv(
            "info", "--connections", "4", peer.uri()).stdout
    with Nbdkit(tmp_path, "memory", "1M") as peer:
        out = json.loads(blockdrv("info", "--json", "--connections", "4",
                                  peer.uri()).stdout)
        assert out["exports"][0]["connections"] == 4


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_list_and_bench_on_every_server(kind, tmp_path):
    image = patterned_image(tmp_path / "disk.img", 16 * MiB)
    extra = {"qemu-nbd": ["-x", "disk"], "embedded": ["--export", "disk"],
             "nbdkit": ["--filter=exportname", "exportname=disk",
                        "exportname-list=explicit"]}[kind]
    if kind == "nbdkit":
        peer = Nbdkit(tmp_path, extra[0], "file", str(image), *extra[1:])
    else:
        peer = file_server(kind, tmp_path, image, *extra)
    with peer:
        listed = json.loads(blockdrv("list", "--json", peer.uri("disk")).stdout)["exports"]
        assert [e["export-name"] for e in listed] == ["disk"]
        out = json.loads(blockdrv("bench", peer.uri("disk"), "--pattern", "mixed", "--size",
                                  "64K", "--depth", "4", "--count", "200", "--json").stdout)
        assert out["ops"] == 200 and out["iops"] > 0


def test_bench_prints_figures(tmp_path):
    with Nbdkit(tmp_path, "memory", "16M") as peer:
        out = json.loads(blockdrv("bench", peer.uri(), "--pattern", "mixed", "--size",
                                  "64K", "--depth", "4", "--count", "200", "--json").stdout)
        assert out["ops"] == 200 and out["iops"] > 0 and out["p50"] <= out["p99"]
        text = blockdrv("bench", peer.uri(), "--count", "100").stdout
        assert "IOPS" in text and "p99" in text
