"""blockdrv-fuzz: the fault proxy, the observer, the model, and the checker checking itself."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import trio
from support.peers import SERVER_KINDS, EmbeddedServer, Nbdkit
from support.proxy import proxied

from blockdrv import ConnectionLostError, ProtocolError, State, open_nbd
from blockdrv.fuzz.model import Model
from blockdrv.fuzz.observer import StreamObserver
from blockdrv.fuzz.proxy import MALFORMED_KINDS, TO_CLIENT, TO_SERVER
from blockdrv.fuzz.runner import FuzzConfig, FuzzRun
from blockdrv.nbd import NBDDevice
from blockdrv.protocol import wire
from blockdrv.util.units import MiB

pytestmark = pytest.mark.interop


async def test_proxy_forwards_and_cuts_in_both_directions(tmp_path):
    with trio.fail_after(60):
        async with proxied(Nbdkit(tmp_path, "memory", "16M"), tmp_path) as (_, proxy, address):
            for direction in (TO_SERVER, TO_CLIENT):
                async with open_nbd(address, reconnect_delay=0) as dev:
                    await dev.pwrite(b"p" * 4096, 0)
                    assert await dev.pread(4096, 0) == b"p" * 4096
                    proxy.cut(direction, 10)  # part-way into the next message
                    with pytest.raises(ConnectionLostError):
                        await dev.pread(65536, 0)
            assert proxy.injected["cut-to-server"] == proxy.injected["cut-to-client"] == 1


async def test_proxy_reset_stall_and_delay(tmp_path):
    with trio.fail_after(60):
        async with proxied(Nbdkit(tmp_path, "memory", "16M"), tmp_path) as (_, proxy, address):
            async with open_nbd(address, reconnect_delay=5, retry_initial=0.05) as dev:
                proxy.reset()
                await dev.pread(512, 0)  # reconnected through the proxy
                assert dev.statistics().reconnects == 1
                proxy.stall(0.3)
                start = trio.current_time()
                await dev.pread(512, 0)
                assert trio.current_time() - start >= 0.25
                proxy.delay(0.05, 1)
                start = trio.current_time()
                await dev.pread(512, 0)
                assert trio.current_time() - start >= 0.09  # both directions held
            assert proxy.injected["reset"] == 1


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize("server_kind", ["nbdkit", "nbdkit-no-sr", "embedded"])
async def test_proxy_malformed_reply_is_a_protocol_error(kind, server_kind, tmp_path):
    peer = {"nbdkit": lambda: Nbdkit(tmp_path, "memory", "16M"),
            "nbdkit-no-sr": lambda: Nbdkit(tmp_path, "--no-sr", "memory", "16M"),
            "embedded": lambda: EmbeddedServer(tmp_path, "--memory", "16M")}[server_kind]()
    with trio.fail_after(60):
        async with proxied(peer, tmp_path) as (_, proxy, address):
            async with open_nbd(address, reconnect_delay=5) as dev:
                await dev.pwrite(b"m" * 8192, 0)
                proxy.malformed(kind)
                with pytest.raises(ProtocolError):
                    for _ in range(10):  # injected before the next reply
                        assert await dev.pread(8192, 0) == b"m" * 8192
                assert dev.state is State.QUIT
            assert proxy.injected["malformed"] == 1


def test_observer_finds_reply_boundaries():
    observer = StreamObserver()
    from blockdrv.protocol.constants import HandshakeFlag, Option, OptionReply
    from blockdrv.protocol.options import (
        encode_client_flags,
        encode_greeting,
        encode_info_export,
        encode_info_request,
        encode_option,
        encode_option_reply,
    )

    assert observer.server_data(encode_greeting(HandshakeFlag.FIXED_NEWSTYLE)) == []
    observer.client_data(encode_client_flags(1) + encode_option(Option.STRUCTURED_REPLY))
    observer.server_data(encode_option_reply(Option.STRUCTURED_REPLY, OptionReply.ACK))
    observer.client_data(encode_option(Option.GO, encode_info_request("")))
    observer.server_data(encode_option_reply(Option.GO, OptionReply.INFO,
                                             encode_info_export(MiB, 1))
                         + encode_option_reply(Option.GO, OptionReply.ACK))
    assert observer.transmission and observer.structured and not observer.extended
    observer.client_data(wire.encode_request(0, 0, 7, 0, 1000))
    assert observer.in_flight == {7: (0, 1000)}
    reply = wire.encode_data_chunk_header(7, 0, 1000, done=True) + bytes(1000)
    assert observer.server_data(reply[:100]) == []
    assert not observer.at_boundary
    assert observer.server_data(reply[100:]) == [len(reply) - 100]
    assert observer.at_boundary and observer.in_flight == {}


def test_model_tracks_known_and_unknown():
    model = Model(64 * 4096)
    model.written(4096, b"x" * 8192)
    assert model.check_read(0, bytes(4096) + b"x" * 8192) is None
    assert model.check_read(4096, b"y" * 4096).offset == 4096
    model.unknown(4096, 4096)
    assert model.check_read(4096, b"y" * 4096) is None
    assert model.check_extents(0, 8192, [(0, 4096, 3), (4096, 4096, 0)]) is None
    assert "claims zeroes" in model.check_extents(8192, 4096, [(8192, 4096, 2)])
    assert "tile" in model.check_extents(0, 8192, [(0, 4096, 0), (8000, 192, 0)])


# --- the checker checks itself: a broken server must fail the run -------------------------


def fuzz(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockdrv.fuzz", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("faults", ["lose-writes", "stale-reads"])
def test_a_server_that_loses_or_stales_data_fails_the_run(faults, tmp_path):
    report = tmp_path / "out.json"
    repro = tmp_path / "repro.json"
    out = fuzz("--seed", "3", "--ops", "1500", "--faults", faults, "--size", "8M",
               "--quiet", "--json", str(report), "--reproducer", str(repro))
    assert out.returncode == 1, out.stderr
    summary = json.loads(report.read_text())
    assert summary["violations"] and "VIOLATION" in out.stderr
    violation = summary["violations"][0]
    assert set(violation) == {"operation", "expected", "found", "at", "invariant"}
    assert violation["invariant"] == "data"  # the model caught it, nothing else
    # The reproducer runs again and fails again.
    again = fuzz("--replay", str(repro), "--quiet", "--reproducer", str(tmp_path / "r2.json"))
    assert again.returncode == 1 and "VIOLATION" in again.stderr


def test_nbdkit_null_fails_the_run(tmp_path):
    out = fuzz("--server-cmd", "nbdkit --foreground --unix {socket} null 8M", "--ops", "800",
               "--faults", "none", "--size", "8M", "--quiet",
               "--reproducer", str(tmp_path / "r.json"))
    assert out.returncode == 1
    assert "VIOLATION" in out.stderr


def test_a_server_that_dies_on_its_own_is_reported_and_restarted(tmp_path):
    """The embedded server kills itself at its 2500th request, every time it runs: a
    6000-operation run meets exactly two crashes (not a race against the clock)."""
    report = tmp_path / "out.json"
    out = fuzz("--server-cmd", f"{sys.executable} -m blockdrv serve --unix {{socket}} "
               "--file {file} --crash-after 2500",
               "--ops", "6000", "--faults", "none", "--size", "8M", "--quiet",
               "--json", str(report), "--reproducer", str(tmp_path / "r.json"))
    assert out.returncode == 3, out.stderr
    assert "SERVER CRASH" in out.stderr and "killed by signal 9" in out.stderr
    assert "VIOLATION" not in out.stderr  # for the driver, each crash is an outage
    summary = json.loads(report.read_text())
    assert summary["violations"] == [] and len(summary["server_crashes"]) == 2
    assert "--crash-after 2500" in summary["server_crashes"][0]
    assert summary["ops_total"] == 6000


def test_a_multi_conn_run_passes(tmp_path):
    report = tmp_path / "out.json"
    out = fuzz("--connections", "3", "--seed", "9", "--ops", "1500", "--size", "8M",
               "--quiet", "--json", str(report), "--reproducer", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["ops_total"] >= 1500


def test_a_good_short_run_passes_and_writes_the_figures(tmp_path):
    report = tmp_path / "out.json"
    out = fuzz("--seed", "5", "--ops", "2000", "--size", "8M", "--quiet", "--json",
               str(report), "--reproducer", str(tmp_path / "repro.json"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(report.read_text())
    for key in ("seed", "ops_total", "faults_injected", "faults_by_kind", "reconnects",
                "drains", "graph_changes", "violations"):
        assert key in summary
    assert summary["ops_total"] == 2000 and summary["violations"] == []


@pytest.mark.parametrize("args, message", [
    (["--faults", "bogus"], "unknown fault 'bogus'"),
    (["--duration", "1", "--ops", "5"], "not both"),
    (["--reconnect-delay", "2"], "reconnect_delay"),
])
def test_bad_arguments(args, message):
    out = fuzz(*args, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


async def test_run_object_reports_a_table_worth_of_figures():
    config = FuzzConfig(seed=9, ops=600, size=4 * MiB, fault_interval=0.2)
    run = FuzzRun(config)
    with trio.fail_after(300):  # far more than the run takes
        result = await run.run()
    assert result.ok, result.violations
    assert result.ops_total == 600 and result.latency(0.5) > 0
    # Nothing the run keeps holds a closed device (fairness monitors once did: every
    # reopened device stayed in memory, and ten-minute runs broke the memory budget).
    gc.collect()
    left = [o for o in gc.get_objects()
            if isinstance(o, NBDDevice) and o.address.socket == run.proxy.path]
    assert left == [], f"{len(left)} closed device(s) still referenced"


async def test_watchdog_turns_a_hang_into_a_report(autojump_clock):
    from blockdrv.fuzz.watchdog import Watchdog

    reports = []
    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            victim = trio.CancelScope()
            dog = Watchdog(10, victim, reports.append)
            nursery.start_soon(dog.run)

            async def stuck_somewhere_specific():
                await trio.Event().wait()  # nobody will ever set it

            with victim:
                for _ in range(5):  # progress keeps it quiet ...
                    await trio.sleep(5)
                    dog.progress()
                async with trio.open_nursery() as inner:
                    inner.start_soon(stuck_somewhere_specific)
            assert victim.cancelled_caught and dog.fired
            assert trio.current_time() >= 25 + 10
    (tree,) = reports
    assert any("stuck_somewhere_specific" in line for line in tree)


# --- the hostile-peer faults -------------------------------------------------------------


def test_split_data_chunk_reassembles_exactly():
    import random as _random

    from blockdrv.fuzz.proxy import split_data_chunk
    from blockdrv.protocol import ReplyCursor, ReplyReader
    from blockdrv.protocol.constants import Command

    data = bytes(range(256)) * 40
    for extended in (False, True):
        message = wire.encode_data_chunk_header(9, 4096, len(data), done=True,
                                                extended=extended) + data
        pieces = split_data_chunk(message, extended=extended, rng=_random.Random(3))
        assert pieces is not None and pieces != message
        reader = ReplyReader(structured=True, extended=extended)
        reader.expect(9, ReplyCursor(Command.READ, 4096, len(data), structured=True,
                                     extended=extended))
        reader.receive_data(pieces)
        got = bytearray(len(data))
        while not isinstance(event := reader.next_event(), type(reader.next_event)) \
                and type(event).__name__ != "_NeedData":
            if type(event).__name__ == "ReadData":
                got[event.offset - 4096:event.offset - 4096 + len(event.data)] = event.data
            if type(event).__name__ == "ReplyDone":
                assert event.error is None
                break
        assert got == data
    assert split_data_chunk(wire.encode_none_chunk(9), extended=False,
                            rng=_random.Random(3)) is None


async def test_proxy_hostile_faults_against_nbdkit(tmp_path):
    """Each hostile-peer fault does what it says, and the driver answers as it must:
    a repeat or a flood ends in ProtocolError, tiny chunks and slowloris still give the
    right bytes, an unrequested context costs one reconnect attempt."""
    from blockdrv.nbd.query import list_exports

    with trio.fail_after(120):
        async with proxied(Nbdkit(tmp_path, "memory", "16M"), tmp_path) as (_, proxy, address):
            proxy.capture = True
            proxy.flood_bytes = 16 * MiB
            async with open_nbd(address, reconnect_delay=10, retry_initial=0.05) as dev:
                await dev.pwrite(bytes(range(256)) * 256, 0)
                proxy.tiny_chunks()
                assert await dev.pread(65536, 0) == bytes(range(256)) * 256
                proxy.slowloris(2048, 4, 0.001)
                assert await dev.pread(4096, 0) == bytes(range(256)) * 16
                proxy.unrequested_context()
                proxy.reset()
                assert await dev.pread(4096, 0) == bytes(range(256)) * 16
                assert dev.statistics().connect_attempts >= 3  # open, refused, accepted
                await dev.pread(4096, 0)  # a finished reply the proxy can repeat
                proxy.duplicate()
                with pytest.raises(ProtocolError, match="unknown cookie"):
                    await dev.pread(4096, 0)
            async with open_nbd(address) as dev:
                proxy.flood("reply")
                with pytest.raises(ProtocolError, match="MAX_REPLY_CHUNKS"):
                    await dev.pread(4096, 0)
            proxy.flood("handshake")
            with pytest.raises(ProtocolError, match="MAX_LIST_ENTRIES"):
                await list_exports(address)
    assert {kind: proxy.injected[kind] for kind in
            ("tiny-chunks", "slowloris", "unrequested-context", "duplicate", "flood")} \
        == {"tiny-chunks": 1, "slowloris": 1, "unrequested-context": 1, "duplicate": 1,
            "flood": 2}


@pytest.mark.parametrize("server", SERVER_KINDS)
def test_a_short_run_with_every_hostile_fault(server, tmp_path):
    """The kinds this fault model added, injected against every server kind, with every
    invariant checked (CI's short form of the ten-minute runs, which add them to the
    default kinds).  Only they, twice as often as by default, so that each run injects
    enough of them: about 20 arrivals in 10 s."""
    report = tmp_path / "out.json"
    kinds = "duplicate,flood,tiny-chunks,unrequested-context,slowloris,cancel-write"
    out = fuzz("--server", server, "--seed", "11", "--duration", "10", "--faults",
               kinds, "--fault-interval", "0.5", "--size", "16M", "--quiet", "--json", str(report),
               "--reproducer", str(tmp_path / "r.json"))
    summary = json.loads(report.read_text())
    assert summary["violations"] == [], summary["violations"][:3]
    for crash in summary["server_crashes"]:  # nbdkit 1.32's known abort only
        assert server == "nbdkit" and "raw_send_socket: Assertion" in crash, crash
    assert out.returncode == (3 if summary["server_crashes"] else 0), out.stderr
    injected = summary["faults_by_kind"]
    assert summary["concurrency"] == 4 * summary["max_in_flight"]
    for key in ("loop_lag_max_s", "rss_peak_mib", "admission_wait_max_s"):
        assert key in summary
    assert summary["admission_overtakes"] == 0
    new = {kind: injected.get(kind, 0) for kind in kinds.split(",")}
    assert sum(new.values()) >= 6 and sum(map(bool, new.values())) >= 4, injected
