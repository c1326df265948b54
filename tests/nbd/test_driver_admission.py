"""Admission: first come, first served, when callers outnumber max_in_flight.

A freed place goes to the oldest waiter and a newcomer never jumps the queue, so with
N callers looping over requests and ``max_in_flight`` M < N, every caller completes
about as many requests as every other, and no request waits more than about one round
of the others (N / M service times).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import trio
from support.inprocess import open_in_process
from support.peers import Nbdkit

from blockdrv import open_nbd
from blockdrv.nbd.admission import Admission
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB


async def callers(dev, n: int, seconds: float) -> tuple[list[int], list[float], list[float]]:
    """``n`` tasks each reading 4 KiB in a loop for ``seconds``: their completion counts,
    every completed request's latency, and each caller's longest wait (counting the
    request still waiting when the time was up)."""
    counts = [0] * n
    latencies: list[float] = []
    longest = [0.0] * n
    started = [0.0] * n
    buf = [bytearray(4096) for _ in range(n)]

    async def caller(i: int) -> None:
        while True:
            started[i] = trio.current_time()
            await dev.pread_into(buf[i], (i * 4096) % (1 * MiB))
            latency = trio.current_time() - started[i]
            latencies.append(latency)
            longest[i] = max(longest[i], latency)
            counts[i] += 1

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(caller, i)
    end = trio.current_time()
    longest = [max(wait, end - start) for wait, start in zip(longest, started, strict=True)]
    return counts, latencies, longest


@pytest.mark.parametrize("sockets", [False, True], ids=["memory", "socketpair"])
async def test_callers_beyond_max_in_flight_are_served_in_turn(sockets, autojump_clock):
    export = Export("", MemoryBackend(8 * MiB))
    export.faults.delay("read", 0.001)  # every request takes one virtual millisecond
    with trio.fail_after(60):
        async with open_in_process(export, sockets=sockets, max_in_flight=4) as (dev, _):
            counts, latencies, _ = await callers(dev, 12, 1.0)
    assert min(counts) > 0, counts
    assert max(counts) <= 1.2 * min(counts) + 1, counts
    # One round is 12 callers / 4 places = 3 service times; nobody waits for more
    # than about one round (the median caller waits exactly one).
    assert max(latencies) <= 1.5 * statistics.median(latencies), (
        max(latencies), statistics.median(latencies))


@pytest.mark.interop
async def test_callers_beyond_max_in_flight_against_nbdkit(tmp_path: Path):
    """The issue's reproducer: 12 callers, max_in_flight 4, nbdkit memory, 1 s."""
    with Nbdkit(tmp_path, "memory", "64M") as server, trio.fail_after(60):
        async with open_nbd(server.uri(), max_in_flight=4) as dev:
            counts, _, longest = await callers(dev, 12, 1.0)
    assert min(counts) > 0, counts
    assert max(counts) <= 2 * min(counts), counts
    # A starved caller waits the whole second; a served one a few milliseconds (this
    # shared machine adds pauses of tens of milliseconds now and then).
    assert max(longest) < 0.25, longest


async def test_admission_hands_places_over_in_arrival_order():
    """Unit test of Admission: newcomers never jump the queue, a place is handed to the
    oldest waiter, and a granted waiter cancelled before it runs gives it back."""
    admission = Admission(lambda admitted: admitted < 1)
    order: list[str] = []
    release = {name: trio.Event() for name in ("first", "victim", "last")}

    async def request(name: str) -> None:
        await admission.enter()
        try:
            order.append(name)
            await release[name].wait()  # a checkpoint: a pending cancellation lands
        finally:
            admission.leave()

    with trio.fail_after(5):
        assert admission.try_enter()  # the test holds the one place
        async with trio.open_nursery() as nursery:
            victim = trio.CancelScope()

            async def cancelled_request(name: str) -> None:
                with victim:
                    await request(name)

            for name in ("first", "victim", "last"):
                nursery.start_soon(cancelled_request if name == "victim" else request, name)
                await trio.testing.wait_all_tasks_blocked()
            assert admission.waiting == 3
            assert not admission.try_enter()  # a newcomer does not jump the queue
            admission.leave()  # the place goes to "first"
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["first"]
            release["first"].set()  # "first" leaves: its place is granted to "victim"...
            await trio.lowlevel.checkpoint()  # ...(first runs and leaves)...
            victim.cancel()  # ...which is cancelled before it could use it
            await trio.testing.wait_all_tasks_blocked()
            assert order[-1] == "last"  # the place went on, not lost
            release["last"].set()
        assert admission.admitted == 0 and admission.waiting == 0


async def test_waiters_cancelled_together_leave_no_phantom_places():
    """A deadline cancels every parked waiter at once: trio takes them out of the queue
    then, long before each runs again.  A place freed in between must not be granted
    to them (that counted phantom requests as admitted and later hung the device)."""
    admission = Admission(lambda admitted: admitted < 1)
    with trio.fail_after(5):
        assert admission.try_enter()
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as waiters:

                async def waiter() -> None:
                    await admission.enter()
                    admission.leave()

                for _ in range(5):
                    waiters.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert admission.waiting == 5
                waiters.cancel_scope.cancel()  # all five are out of the queue now...
                admission.leave()  # ...so this place goes to nobody
            nursery.cancel_scope.cancel()
        assert admission.admitted == 0 and admission.waiting == 0
        assert admission.try_enter()  # and it is there for the next request


async def test_admission_tells_the_monitor_who_got_the_place():
    """The monitor hears of a hand-over in the leaving task, naming the waiter, before
    the waiter runs (blockdrv-fuzz times admission waits by it)."""
    admission = Admission(lambda admitted: admitted < 1)
    events: list[tuple[str, object]] = []

    class Recorder:
        def entered(self, overtaken: int) -> None:
            events.append(("entered", trio.lowlevel.current_task()))

        def parked(self) -> object:
            return trio.lowlevel.current_task()

        def handed_over(self, task: trio.lowlevel.Task) -> None:
            events.append(("handed_over", task))

        def granted(self, token: object) -> None:
            events.append(("granted", token))

        def abandoned(self, token: object) -> None:
            events.append(("abandoned", token))

        def left(self) -> None:
            events.append(("left", trio.lowlevel.current_task()))

        def rule_changed(self) -> None:
            events.append(("rule_changed", None))

    admission.monitor = Recorder()
    waiter: list[trio.lowlevel.Task] = []

    async def wait_for_a_place() -> None:
        waiter.append(trio.lowlevel.current_task())
        await admission.enter()
        admission.leave()

    with trio.fail_after(5):
        assert admission.try_enter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_a_place)
            await trio.testing.wait_all_tasks_blocked()
            admission.leave()
            me = trio.lowlevel.current_task()
            assert events == [("entered", me), ("left", me), ("handed_over", waiter[0])]
    assert events[3:] == [("granted", waiter[0]), ("left", waiter[0])]
