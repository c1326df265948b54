"""The block graph: filters, drained sections, live insertion and removal (issue 5)."""

from __future__ import annotations

import errno
import random

import pytest
import trio
import trio.testing
from support.inprocess import URI, open_in_process, serving
from support.workload import workload
from trio_util import AsyncValue

from blockdrv import RequestError, open_nbd
from blockdrv.block import (
    FaultFilter,
    FilterNode,
    ThrottleFilter,
    TraceFilter,
    insert_filter,
    remove_filter,
    replace_node,
)
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB


def device(size=4 * MiB, **options):
    """An in-process server on ``size`` bytes and a device on it; yields (dev, srv)."""
    return open_in_process(Export("", MemoryBackend(size)), **options)


def transparent_filters(seed: int) -> list[FilterNode]:
    """Filters that change timing only, so no request may fail because of them."""
    fault = FaultFilter(seed=seed)
    fault.add_rule(["read", "write"], errno=None, delay=0.002, rate=0.3)
    return [TraceFilter(), ThrottleFilter(bytes_per_second=400 * MiB, ops_per_second=20000),
            fault, TraceFilter(capacity=None)]


async def churn(dev, seed: int, stop: trio.Event, counter: list[int]) -> None:
    """Insert and remove filters on the live device at random moments."""
    rng = random.Random(seed)
    inserted: list[FilterNode] = []
    pool = transparent_filters(seed)
    while not stop.is_set():
        for _ in range(rng.randrange(30)):  # a random moment in the request traffic
            await trio.lowlevel.checkpoint()
        free = [f for f in pool if f.inserted_on is None]
        if inserted and (not free or rng.random() < 0.5):
            victim = inserted.pop(rng.randrange(len(inserted)))
            await remove_filter(victim)
        else:
            f = rng.choice(free)
            await insert_filter(dev, f)
            inserted.append(f)
        counter[0] += 1
    for f in inserted:
        await remove_filter(f)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_filters_inserted_and_removed_under_load_lose_nothing(seed, autojump_clock):
    shadow = bytearray(2 * MiB)
    with trio.fail_after(600):
        async with device(2 * MiB, server_options={"shuffle_replies": True,
                                                   "seed": seed}) as (dev, srv):
            stop, changes = trio.Event(), [0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn, dev, seed, stop, changes)
                done = await workload(dev, shadow, tasks=32, ops=25, seed=seed)
                stop.set()
            assert done == 800 and changes[0] >= 20
            assert dev.filters == ()
            assert await dev.pread(len(shadow), 0) == shadow


async def test_filter_churn_across_a_server_restart(autojump_clock):
    shadow = bytearray(2 * MiB)
    with trio.fail_after(600):
        async with device(2 * MiB, reconnect_delay=10, retry_initial=0.2) as (dev, srv):
            stop, changes, progress = trio.Event(), [0], AsyncValue(0)

            async def outage():
                await progress.wait_value(lambda n: n >= 200)
                srv.kill()
                await trio.sleep(2)  # the outage lasts two (virtual) seconds
                srv.restart()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn, dev, 7, stop, changes)
                nursery.start_soon(outage)
                done = await workload(dev, shadow, tasks=32, ops=25, seed=7,
                                      progress=progress)
                stop.set()
            assert done == 800 and changes[0] >= 10
            assert dev.statistics().reconnects == 1
            assert await dev.pread(len(shadow), 0) == shadow


async def test_io_on_the_same_node_goes_through_the_inserted_filter():
    with trio.fail_after(30):
        async with device() as (dev, srv):
            trace = TraceFilter()
            await insert_filter(dev, trace)
            await dev.pwrite(b"a" * 512, 0)
            assert await dev.pread(512, 0) == b"a" * 512
            assert [r.kind for r in trace.records] == ["write", "read"]
            # The filter reached the real node, once per request (no loop back).
            assert dev.statistics().requests == 2
            await remove_filter(trace)
            await dev.pread(512, 0)
            assert len(trace.records) == 2


async def test_filters_stack_last_inserted_first():
    order = []
    with trio.fail_after(30):
        async with device() as (dev, srv):
            low = TraceFilter(callback=lambda r: order.append("low"))
            high = TraceFilter(callback=lambda r: order.append("high"))
            await insert_filter(dev, low)
            await insert_filter(dev, high)
            await dev.flush()
            assert order == ["low", "high"]  # records complete inside-out
            await remove_filter(low)  # from the middle of the stack
            order.clear()
            await dev.flush()
            assert order == ["high"]
            assert high.child is not None and dev.filters == (high,)
            await remove_filter(high)
            assert dev.filters == ()
            with pytest.raises(ValueError):
                await remove_filter(high)


async def test_replace_node_redirects_users():
    with trio.fail_after(30):
        async with serving(Export("", MemoryBackend(MiB))) as a, \
                serving(Export("", MemoryBackend(MiB))) as b:
            async with open_nbd(URI, stream_factory=a.connect) as old, \
                    open_nbd(URI, stream_factory=b.connect) as new:
                trace = TraceFilter()
                await insert_filter(old, trace)
                await replace_node(old, new)
                await old.pwrite(b"n" * 512, 0)  # through old's filter, into new
                assert await new.pread(512, 0) == b"n" * 512
                assert len(trace.records) == 1
                await replace_node(old, old)  # undo
                assert await old.pread(512, 0) == bytes(512)
                await replace_node(old, new)
                with pytest.raises(ValueError, match="loop"):
                    await replace_node(new, old)
                await replace_node(old, old)


async def test_routing_is_edited_only_inside_a_drained_section():
    """The port's routing belongs to the node: the graph edits it through the node's
    methods, and the node refuses an edit that would race with requests being routed."""
    with trio.fail_after(30):
        async with device() as (dev, srv):
            trace = TraceFilter()
            for edit in (lambda: dev.push_proxy(trace), lambda: dev.redirect(None)):
                with pytest.raises(RuntimeError, match="outside a drained section"):
                    edit()
            assert dev.filters == () and dev.replacement is None
            async with dev.drained():
                below = dev.push_proxy(trace)
                assert dev.filters == (trace,) and below is not dev
                assert dev.pull_proxy(trace) is None
            assert dev.filters == ()


# --- drained sections ----------------------------------------------------------------------


async def test_drain_while_a_throttle_holds_requests_back(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            throttle = ThrottleFilter(ops_per_second=1, burst_ops=1)
            await insert_filter(dev, throttle)
            finished = []

            async def read(i):
                await dev.pread(512, 0)
                finished.append((i, trio.current_time()))

            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                for i in range(4):
                    nursery.start_soon(read, i)
                await trio.testing.wait_all_tasks_blocked()
                assert len(finished) == 1  # the burst let one through
                async with dev.drained():
                    # The drain waited for the throttle to release every request.
                    assert len(finished) == 4
                    assert trio.current_time() - start >= 3
                    assert dev.in_flight.value == 0
            times = sorted(t - start for _, t in finished)
            assert [round(t) for t in times] == [0, 1, 2, 3]  # one per second, none failed


async def test_nested_and_concurrent_drains(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            fault = FaultFilter()
            fault.add_rule("read", errno=None, delay=2)
            await insert_filter(dev, fault)
            results, entered = [], []

            async def read():
                results.append(await dev.pread(512, 0))

            async def drainer(name, hold):
                async with dev.drained():
                    entered.append((name, trio.current_time()))
                    async with dev.drained():  # nested
                        await trio.sleep(hold)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(drainer, "a", 1)
                nursery.start_soon(drainer, "b", 3)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(read)  # arrives during the drains: must wait
                await trio.testing.wait_all_tasks_blocked()
                assert len(results) == 0
            assert sorted(name for name, _ in entered) == ["a", "b"]
            assert all(t >= 2 for _, t in entered)  # after the first read finished
            assert len(results) == 2 and all(r == bytes(512) for r in results)


async def test_standalone_filter_drain_composes_down(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            slow = FaultFilter(dev)
            slow.add_rule("write", errno=None, delay=5)
            outer = TraceFilter(slow)
            done = []

            async def direct_write():  # through the device itself, not the filters
                await dev.pwrite(b"d" * 512, 0)
                done.append("direct")

            async def filtered_write():
                await outer.pwrite(b"f" * 512, 512)
                done.append("filtered")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(direct_write)
                nursery.start_soon(filtered_write)
                await trio.testing.wait_all_tasks_blocked()
                async with outer.drained():  # drains slow and dev too
                    assert sorted(done) == ["direct", "filtered"]


async def test_remove_filter_finishes_its_pending_requests_first(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            throttle = ThrottleFilter(ops_per_second=2, burst_ops=1)
            trace = TraceFilter()
            await insert_filter(dev, trace)
            await insert_filter(dev, throttle)
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(dev.pread, 512, i * 512)
                await trio.testing.wait_all_tasks_blocked()
                await remove_filter(throttle)
                assert len(trace.records) == 5  # all went through before removal
                assert throttle.in_flight.value == 0 and throttle.child is None
                await dev.pread(512, 0)  # the new path: no throttle
            assert len(trace.records) == 6


# --- throttle -----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["bytes", "ops"])
async def test_throttle_holds_to_its_limit(limit, autojump_clock):
    with trio.fail_after(600):
        async with device(16 * MiB) as (dev, srv):
            if limit == "bytes":
                throttle = ThrottleFilter(dev, bytes_per_second=2 * MiB)
            else:
                throttle = ThrottleFilter(dev, ops_per_second=100)
            moved = ops = 0
            start = trio.current_time()

            async def reader(lane):
                nonlocal moved, ops
                rng = random.Random(lane)
                while trio.current_time() - start < 5:
                    await throttle.pread(65536, rng.randrange(255) * 65536)
                    moved += 65536
                    ops += 1

            async with trio.open_nursery() as nursery:
                for lane in range(8):
                    nursery.start_soon(reader, lane)
            elapsed = trio.current_time() - start
            # One second of burst is allowed on top of the rate.
            if limit == "bytes":
                rate = (moved - 2 * MiB) / elapsed
                assert abs(rate - 2 * MiB) <= 0.1 * 2 * MiB, rate
            else:
                rate = (ops - 100) / elapsed
                assert abs(rate - 100) <= 10, rate


async def test_throttle_limits_change_while_running(autojump_clock):
    with trio.fail_after(600):
        async with device() as (dev, srv):
            throttle = ThrottleFilter(dev, ops_per_second=1, burst_ops=1)
            times = []

            async def reads():
                for _ in range(6):
                    await throttle.pread(512, 0)
                    times.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reads)
                await trio.sleep(2.5)
                throttle.set_limits(ops_per_second=100)
            # Slow at first (one per second), then fast: the waiting request saw the
            # change at once instead of finishing its old one-second wait.
            assert times[1] - times[0] >= 0.99
            assert times[-1] - times[-3] < 0.1
            assert throttle.limits["ops_per_second"] == 100


# --- trace and fault -----------------------------------------------------------------------


async def test_trace_records_every_request_once_with_its_real_result(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            fault = FaultFilter(dev)
            fault.add_rule("write", errno=errno.ENOSPC, every=3)
            trace = TraceFilter(fault, capacity=None)
            outcomes = []
            for i in range(9):
                try:
                    await trace.pwrite(b"t" * 512, i * 512)
                    outcomes.append("ok")
                except RequestError as exc:
                    outcomes.append(errno.errorcode[exc.errno])
            await trace.flush()
            with trio.move_on_after(0):  # cancelled before it could finish
                await trace.pread(512, 0)
            results = [r.result for r in trace.records]
            assert results == outcomes + ["ok", "cancelled"]
            assert [r.kind for r in trace.records] == ["write"] * 9 + ["flush", "read"]
            assert [r.offset for r in trace.records][:9] == [i * 512 for i in range(9)]
            assert trace.count == 11


async def test_trace_ring_is_bounded_and_callback_sees_all():
    seen = []
    with trio.fail_after(60):
        async with device() as (dev, srv):
            trace = TraceFilter(dev, capacity=3, callback=seen.append)
            for i in range(5):
                await trace.pread(512, i * 512)
            assert [r.offset for r in trace.records] == [1024, 1536, 2048]
            assert len(seen) == 5 and trace.count == 5
            assert all(r.latency >= 0 and r.result == "ok" for r in seen)


async def test_fault_rules_once_every_after_rate_range_and_removal(autojump_clock):
    with trio.fail_after(60):
        async with device() as (dev, srv):
            fault = FaultFilter(dev, seed=42)

            async def outcomes(n, offset=0):
                out = []
                for _ in range(n):
                    try:
                        await fault.pread(512, offset)
                        out.append(0)
                    except RequestError as exc:
                        out.append(exc.errno)
                return out

            rule = fault.add_rule("read", errno=errno.EIO, once=True)
            assert await outcomes(3) == [errno.EIO, 0, 0]
            fault.remove_rule(rule)
            rule = fault.add_rule("read", errno=errno.EPERM, every=2, after=1)
            assert await outcomes(5) == [0, 0, errno.EPERM, 0, errno.EPERM]
            fault.remove_rule(rule)
            fault.add_rule("read", errno=errno.EIO, byte_range=(MiB, 4096))
            assert await outcomes(2, 0) == [0, 0]
            assert await outcomes(2, MiB + 1024) == [errno.EIO, errno.EIO]
            fault.clear()
            fault.add_rule("read", errno=errno.EIO, rate=0.5)
            got = await outcomes(200)
            assert 70 < got.count(errno.EIO) < 130
            fault.clear()
            fault.add_rule("write", errno=errno.ENOSPC, delay=3)
            start = trio.current_time()
            with pytest.raises(RequestError):
                await fault.pwrite(b"x" * 512, 0)
            assert trio.current_time() - start >= 3  # delayed, then failed
            assert fault.injected["error"] > 0 and fault.injected["delay"] == 1
            with pytest.raises(ValueError):
                fault.add_rule("read", errno=None)


async def test_filter_without_a_child_says_so():
    trace = TraceFilter()
    with pytest.raises(RuntimeError, match="no child"):
        trace.size  # noqa: B018
