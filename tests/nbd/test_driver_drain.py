"""Drained sections: they wait for what is in flight (an outage included), nest and
never cancel; their owner does I/O through the handle and never hangs on itself."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from support.inprocess import (
    disk,
    open_in_process,
    wait_until_waiting,
)
from support.outcomes import outcome

from blockdrv import (
    DeadlockError,
)
from blockdrv.block import TraceFilter, insert_filter


async def test_the_owner_does_io_through_the_sections_handle(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process() as (dev, _):
            await dev.pwrite(b"d" * 4096, 0)
            async with dev.drained() as io:
                assert dev.draining
                assert await io.pread(4096, 0) == b"d" * 4096
                await io.pwrite(b"e" * 4096, 4096)
                await io.flush()
                assert [e.offset for e in await io.block_status(8192, 0)] == [0]
            assert not dev.draining
            assert await dev.pread(4096, 4096) == b"e" * 4096


@pytest.mark.parametrize("call", ["pread", "pwrite", "flush", "block_status"])
async def test_the_owners_own_direct_io_fails_at_once(call, autojump_clock):
    """`async with dev.drained(): await dev.pread(...)` used to wait forever."""
    args = {"pread": (4096, 0), "pwrite": (b"x" * 4096, 0), "flush": (),
            "block_status": (4096, 0)}[call]
    with trio.fail_after(60):
        async with open_in_process() as (dev, _):
            async with dev.drained():
                with pytest.raises(DeadlockError, match="own drained section") as caught:
                    await getattr(dev, call)(*args)
                assert caught.value.errno == 35  # EDEADLK
            await getattr(dev, call)(*args)  # and after the section, as usual


async def test_other_tasks_still_wait_for_the_section(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process() as (dev, _):
            order: list[str] = []

            async def other() -> None:
                await dev.pread(512, 0)
                order.append("other")

            async with trio.open_nursery() as nursery:
                async with dev.drained() as io:
                    nursery.start_soon(other)
                    await trio.testing.wait_all_tasks_blocked()
                    await io.pread(512, 0)
                    order.append("owner")
            assert order == ["owner", "other"]


async def test_the_handle_passes_the_gates_below_a_filter_and_multiconn(autojump_clock):
    """Draining composes down the graph; the handle's I/O passes every gate the
    section closed: a filter inserted on the device, and a multi-conn device's members."""
    with trio.fail_after(60):
        async with open_in_process(connections=2) as (dev, _):
            trace = TraceFilter(capacity=10)
            await insert_filter(dev, trace)
            async with dev.drained() as io:
                await io.pwrite(b"m" * 4096, 0)
                with pytest.raises(DeadlockError):
                    await dev.members[0].pread(4096, 0)
            assert [r.kind for r in trace.records] == ["write"]
            assert dev.filters == (trace,)
            assert await dev.pread(4096, 0) == b"m" * 4096


@pytest.mark.parametrize("comes_back_after", [None, 3])
async def test_drain_during_an_outage(comes_back_after, autojump_clock):
    export = disk()
    export.faults.delay("write", 1)
    with trio.fail_after(120):
        async with open_in_process(export, reconnect_delay=10,
                                   retry_initial=0.5) as (dev, srv):
            outcomes = []

            async def write(i):
                await outcome(outcomes, dev.pwrite, b"w" * 512, i * 512)

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(write, i)
                await wait_until_waiting(dev, 4)
                srv.kill()
                if comes_back_after:
                    nursery.start_soon(srv.restart_after, comes_back_after)
                start = trio.current_time()
                late = trio.Event()

                async def late_request():
                    await dev.pread(512, 0)
                    late.set()

                async with dev.drained():
                    elapsed = trio.current_time() - start
                    assert dev.in_flight.value == 0
                    nursery.start_soon(late_request)
                    await trio.testing.wait_all_tasks_blocked()
                    assert not late.is_set()  # new requests wait during the section
                    if comes_back_after is None:
                        # The drain waited for the requests, which the reconnect delay
                        # (not the drain) ended.
                        assert 10 <= elapsed <= 10.5
                        srv.restart()
                        await srv.accepted.wait()  # the worker is back on the server
                        await trio.testing.wait_all_tasks_blocked()
                    else:
                        assert comes_back_after <= elapsed < 10
            assert outcomes == (["failed"] * 4 if comes_back_after is None else ["ok"] * 4)
            assert late.is_set()


async def test_drains_nest_and_never_cancel(autojump_clock):
    export = disk()
    export.faults.delay("read", 5)
    with trio.fail_after(60):
        async with open_in_process(export) as (dev, srv):
            results = []

            async def read():
                results.append(await dev.pread(512, 0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await wait_until_waiting(dev, 1)
                start = trio.current_time()
                async with dev.drained():
                    async with dev.drained():
                        assert results == [bytes(512)]  # finished, not cancelled
                        assert trio.current_time() - start >= 5
                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(results) == 1  # outer drain still holds new requests
            assert len(results) == 2
