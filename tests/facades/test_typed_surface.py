"""The typed, consistent surface (issue 15): sync and aio open_nbd carry open_nbd's
parameters for type checkers; list_exports spells TLS as open_nbd does and raises
NBDError subclasses."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import trio

import blockdrv
from blockdrv import ConnectError, aio, sync
from blockdrv.nbd.query import list_exports, list_meta_contexts

GOOD = """
    import asyncio
    import blockdrv.aio, blockdrv.sync

    def blocking() -> int:
        with blockdrv.sync.open_nbd("nbd://localhost", reconnect_delay=5.0,
                                    meta_contexts=["qemu:dirty-bitmap:b0"]) as dev:
            return dev.size

    async def main() -> bytes:
        async with blockdrv.aio.open_nbd("nbd://localhost", tls_ca="ca.pem",
                                         max_in_flight=8) as dev:
            return await dev.pread(4096, 0)
"""

BAD = {
    "sync-type": 'blockdrv.sync.open_nbd("nbd://localhost", reconnect_delay="5")',
    "sync-name": 'blockdrv.sync.open_nbd("nbd://localhost", recconect_delay=5)',
    "aio-type": 'blockdrv.aio.open_nbd("nbd://localhost", max_in_flight="8")',
    "aio-name": 'blockdrv.aio.open_nbd("nbd://localhost", ca="ca.pem")',
}


def mypy(tmp_path, source: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), str(snippet)],
                          capture_output=True, text=True, timeout=300)


def test_mypy_accepts_correct_use(tmp_path):
    result = mypy(tmp_path, GOOD)
    assert result.returncode == 0, result.stdout


def test_mypy_rejects_misused_parameters(tmp_path):
    source = "import blockdrv.aio, blockdrv.sync\n" + "".join(
        f"def {name.replace('-', '_')}() -> None:\n    {call}\n" for name, call in BAD.items())
    result = mypy(tmp_path, source)
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == len(BAD), result.stdout  # one for each misuse


def test_signatures_mirror_open_nbd():
    model = inspect.signature(blockdrv.open_nbd).parameters
    for flavour in (sync.open_nbd, aio.open_nbd):
        assert inspect.signature(flavour).parameters == model


def test_list_exports_missing_socket_is_a_connect_error(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/missing.sock"

    async def main() -> None:
        for ask in (list_exports, list_meta_contexts):
            with pytest.raises(ConnectError) as failure:
                await ask(uri)
            assert "missing.sock" in str(failure.value)

    trio.run(main)


def test_list_exports_tls_spelling(tmp_path):
    uri = f"nbd+unix:///?socket={tmp_path}/missing.sock"

    async def main() -> None:
        # tls_ca= as open_nbd spells it: a missing CA file is named before connecting
        with pytest.raises(blockdrv.TLSError, match="nowhere.pem"):
            await list_exports(uri, tls="require", tls_ca=str(tmp_path / "nowhere.pem"))
        with pytest.warns(DeprecationWarning, match="tls_ca"), \
                pytest.raises(blockdrv.TLSError, match="nowhere.pem"):
            await list_exports(uri, tls="require", ca=str(tmp_path / "nowhere.pem"))

    trio.run(main)


def test_public_async_calls_state_what_they_raise():
    from blockdrv import MultiConnDevice, NBDDevice
    from blockdrv.aio import AioDevice, AioDrainedSection
    from blockdrv.block.node import DrainedSection

    silent = []
    for cls in (NBDDevice, MultiConnDevice, DrainedSection, AioDevice, AioDrainedSection):
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_") and (inspect.iscoroutinefunction(member)
                                             or inspect.isasyncgenfunction(member)):
                if "Raises" not in (inspect.getdoc(member) or ""):
                    silent.append(f"{cls.__name__}.{name}")
    for function in (blockdrv.open_nbd, aio.open_nbd, sync.open_nbd, list_exports,
                     list_meta_contexts):
        if "Raises" not in (inspect.getdoc(function) or ""):
            silent.append(function.__qualname__)
    assert silent == []
