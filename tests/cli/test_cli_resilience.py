"""The ``blockdrv`` command when things go wrong (issue 16): a server restarted in the
middle of a copy, a server that never answers, SIGINT, and the README's quick start
run as written.

Every test drives the command as a subprocess against real servers (or a raw listener
that says nothing) and waits on what the command or the listener shows (a progress
line, an accepted connection), never on time; each has a subprocess timeout.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from support.peers import QemuNbd

from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
BLOCKDRV = [sys.executable, "-m", "blockdrv"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen([*BLOCKDRV, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, pass_fds=pass_fds)


def progress_lines(fd: int) -> Iterator[int]:
    """The percentages a copy writes with --progress=FD, as they come."""
    with os.fdopen(fd) as lines:
        for line in lines:
            yield int(line.split("/")[0])


def test_copy_survives_a_server_restart(tmp_path):
    """qemu-nbd is killed (-9) and started again on the same socket while the copy
    is a few per cent in; with --reconnect-delay the copy finishes, identical."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(16).randbytes(128 * MiB))
    copy = tmp_path / "copy.img"
    with QemuNbd(tmp_path, image) as server:
        read, write = os.pipe()
        command = start("copy", "--reconnect-delay", "30", f"--progress={write}",
                        server.uri(), str(copy), pass_fds=(write,))
        os.close(write)
        try:
            restarted, last = False, -1
            for last in progress_lines(read):  # to the copy's end
                if not restarted and 0 < last < 50:
                    server.kill()  # half the data is still to come: mid-copy
                    server.start()
                    restarted = True
            out, err = command.communicate(timeout=120)
        finally:
            command.kill()
    assert command.returncode == 0, err
    assert restarted and last == 100
    assert sha256(copy) == sha256(image)
    assert re.search(r"; \d+ reconnects?$", err.strip()), err


def silent_listener(tmp_path: Path) -> socket.socket:
    """A Unix socket that accepts connections (the kernel does) and never says a word."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen(64)
    return listener


@pytest.mark.parametrize("args", [
    ["info"], ["list"], ["map"], ["copy", "{uri}", "null:"], ["bench", "--count", "1"],
    ["copy", "--open-timeout", "1.5", "{uri}", "null:"],
])
def test_a_silent_server_ends_the_command_within_its_timeouts(tmp_path, args):
    uri = f"nbd+unix:///?socket={tmp_path}/silent.sock"
    with silent_listener(tmp_path):
        argv = [arg.format(uri=uri) for arg in args]
        if "{uri}" not in args:
            argv.append(uri)
        # the bound: the timeouts given plus the interpreter's start and a margin
        result = subprocess.run([*BLOCKDRV, argv[0], "--connect-timeout", "1", *argv[1:]],
                                capture_output=True, text=True, timeout=1 + 1.5 + 15)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"unix:{tmp_path}/silent.sock: no answer within 1s" in lines[0]
    if "--open-timeout" in args:
        assert lines[0].endswith("(still failing after 1.5s)")


def test_sigint_during_a_copy_exits_130_with_one_line(tmp_path):
    # every read takes 2 s: after "0/100" the copy is under way and cannot be done
    from support.peers import Nbdkit

    copy = tmp_path / "copy.img"
    with Nbdkit(tmp_path, "--filter=delay", "pattern", "64M", "rdelay=2") as server:
        read, write = os.pipe()
        command = start("copy", f"--progress={write}", server.uri(), str(copy),
                        pass_fds=(write,))
        os.close(write)
        try:
            assert next(progress_lines(read)) == 0
            command.send_signal(signal.SIGINT)
            out, err = command.communicate(timeout=60)
        finally:
            command.kill()
    assert command.returncode == 130
    assert err.splitlines() == [f"Interrupted: {copy} is incomplete (0 bytes copied)"]


def test_sigint_during_a_handshake_exits_130_with_one_line(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/silent.sock"
    with silent_listener(tmp_path) as listener:
        command = start("info", uri)
        try:
            listener.settimeout(60)
            connection, _ = listener.accept()  # the command is in the handshake now
            with connection:
                command.send_signal(signal.SIGINT)
                out, err = command.communicate(timeout=60)
        finally:
            command.kill()
    assert command.returncode == 130
    assert err.splitlines() == ["Interrupted"]


def quick_start() -> str:
    """The shell lines of the README's quick start, less the install."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install and quick start", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return "\n".join(line for line in block.splitlines()
                     if not line.startswith("pip install"))


@pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "--net", "true"], capture_output=True).returncode != 0,
    reason="needs a network namespace of its own (unshare --net, as root)")
def test_the_readme_quick_start_runs_as_written(tmp_path):
    """On a fresh machine: a network namespace of its own, so localhost:10809 is free
    whatever else runs here."""
    # the scaffolding around the README's lines: loopback up, and no server left behind
    script = ("set -e\nip link set lo up\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
              + quick_start())
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    shell = subprocess.Popen(["unshare", "--net", "bash", "-c", script], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = shell.communicate(timeout=120)
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
    assert shell.returncode == 0, out + err
    assert "\texport-size: 1073741824 (1G)" in out
    backup = tmp_path / "backup.img"
    assert backup.stat().st_size == 1 << 30 and backup.stat().st_blocks == 0


FLOODS = {
    "info": (["info"], "flood_info", "MAX_INFO_REPLIES"),
    "list": (["list"], "flood_list", "MAX_LIST_ENTRIES"),
    "map": (["map"], "reply", "MAX_REPLY_CHUNKS"),
    "copy": (["copy"], "reply", "MAX_REPLY_CHUNKS"),
}


@pytest.mark.parametrize("command", list(FLOODS))
def test_a_flooding_server_ends_the_command_with_one_line(command, tmp_path):
    """A server that answers with an endless stream (option replies, error chunks)
    ends every command at once with one line naming the cap, never a hang."""
    from support.hostile import HostileServer, Script, repeat

    from blockdrv.protocol import wire

    def error_chunks(conn, request):
        return repeat(wire.encode_error_chunk(request.cookie, 5, "again", done=False))

    args, knob, cap = FLOODS[command]
    script = Script(**({knob: True} if knob != "reply" else {"reply": error_chunks}))
    with HostileServer(tmp_path, script) as server:
        extra = [str(tmp_path / "out.img")] if command == "copy" else []
        result = subprocess.run([*BLOCKDRV, *args, "--connect-timeout", "5", server.uri,
                                 *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert cap in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
