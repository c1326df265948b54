"""The fuzzer's judge and monitors on made-up outcomes: no server, no proxy, no I/O."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from blockdrv import ConnectionLostError, ProtocolError, RequestError, State
from blockdrv.fuzz.availability import Availability
from blockdrv.fuzz.config import DEFAULT_FAULTS, HOSTILE_FAULTS, FuzzConfig, parse_faults
from blockdrv.fuzz.model import Model
from blockdrv.fuzz.monitors import FairnessMonitor, MemoryMonitor, StepTimer
from blockdrv.fuzz.oracle import Circumstances, Oracle
from blockdrv.fuzz.records import Op
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.util.units import MiB


def oracle():
    found: list[tuple[str, str, str, str]] = []
    config = FuzzConfig(size=MiB)
    return Oracle(config, Model(MiB, 4096), lambda *v: found.append(v)), found


def test_reads_are_checked_against_what_was_written():
    judge, found = oracle()
    judge.succeeded(Op(1, "write", 4096, 4096), None, b"w" * 4096)
    judge.succeeded(Op(2, "read", 0, 8192), bytes(4096) + b"w" * 4096, None)
    assert found == []
    judge.succeeded(Op(3, "read", 4096, 4096), b"x" * 4096, None)
    assert [v[3] for v in found] == ["data"] and "#3 read" in found[0][0]


def test_a_failed_write_makes_its_range_unknown_not_a_violation():
    judge, found = oracle()
    judge.succeeded(Op(1, "write", 0, 4096), None, b"w" * 4096)
    judge.failed(Op(2, "write", 0, 4096), RequestError("x", errno=5),
                 Circumstances(errors_injected=True))
    judge.succeeded(Op(3, "read", 0, 4096), b"?" * 4096, None)  # anything goes now
    assert found == []


@pytest.mark.parametrize("exc, around, explained", [
    (ProtocolError("bad"), Circumstances(), False),
    (ProtocolError("bad"), Circumstances(protocol_faults=1), True),
    (RequestError("eio", errno=5), Circumstances(), False),
    (RequestError("eio", errno=5), Circumstances(errors_injected=True), True),
    (ConnectionLostError("gone"), Circumstances(), False),
    (ConnectionLostError("gone"), Circumstances(cancel_in_flight=True), True),
    (ConnectionLostError("gone"), Circumstances(cancel_in_flight=True, delay_expired=True),
     False),
    (ConnectionLostError("gone"), Circumstances(delay_expired=True,
                                                unreachable_throughout=True), True),
    (ConnectionLostError("gone"), Circumstances(state=State.QUIT, protocol_faults=2), True),
    (ValueError("drain"), Circumstances(protocol_faults=3, errors_injected=True), False),
])
def test_only_the_right_circumstances_explain_a_failure(exc, around, explained):
    judge, found = oracle()
    reason = judge.failed(Op(1, "read", 0, 4096), exc, around)
    assert (reason is not None) is explained
    assert (found == []) is explained


def test_durations_hangs_and_late_cancellations():
    judge, found = oracle()
    judge.duration(Op(1, "read", 0, 4096), 1.0, hung=False, cancelled=False)
    judge.duration(Op(2, "read", 0, 4096, cancel_after=0.5), 3.0, hung=False, cancelled=True)
    assert found == []  # 0.5 + cancel_timeout (2) + 1 >= 3
    judge.duration(Op(3, "read", 0, 4096, cancel_after=0.5), 3.6, hung=False, cancelled=True)
    judge.duration(Op(4, "read", 0, 4096), 99.0, hung=True, cancelled=False)
    # A storm kept the server away for all but 9.9 s of it: excused; for 10 s: not.
    judge.duration(Op(5, "read", 0, 4096), 99.0, hung=True, cancelled=False, reachable=9.9)
    judge.duration(Op(6, "read", 0, 4096), 99.0, hung=True, cancelled=False, reachable=10)
    assert [(v[0], v[3]) for v in found] == [("#3 read 0+4096", "deadline"),
                                             ("#4 read 0+4096", "deadline"),
                                             ("#6 read 0+4096", "deadline")]


def test_fault_specs():
    assert parse_faults("default") == DEFAULT_FAULTS
    assert set(HOSTILE_FAULTS) <= set(parse_faults("default"))
    assert "kill" not in parse_faults("default,-kill")
    assert parse_faults("none,flood,duplicate") == ("flood", "duplicate")
    assert "lose-writes" in parse_faults("all") and "lose-writes" not in parse_faults("default")
    with pytest.raises(InvalidArgumentError, match="unknown fault 'bogus'"):
        parse_faults("default,bogus")
    assert FuzzConfig(max_in_flight=6).concurrency == 24  # oversubscribed by default


async def served_for(monitor: FairnessMonitor, seconds: float) -> None:
    """A request admitted at once that holds its place for ``seconds``."""
    monitor.entered(0)
    await trio.sleep(seconds)
    monitor.left()


async def test_fairness_monitor_reports_overtakes_and_long_waits(autojump_clock):
    found: list[tuple[str, str, str, str]] = []
    monitor = FairnessMonitor(2, lambda *v: found.append(v))
    monitor.entered(0)
    monitor.left()
    assert found == []
    monitor.entered(3)  # a newcomer passed three waiting requests
    assert found[-1][3] == "fairness" and "3 waiting" in found[-1][2]
    # A request waits 10 s while one other, served in 1 s, was admitted: bound 2 s.
    token = monitor.parked()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(served_for, monitor, 1)
    await trio.sleep(9)
    monitor.granted(token)
    assert "waited 10.00 s" in found[-1][2] and "within 2.00 s" in found[-1][1]
    # Across a change of the rule (an outage), waits are not held to the bound.
    token = monitor.parked()
    monitor.rule_changed()
    await trio.sleep(30)
    before = len(found)
    monitor.granted(token)
    assert len(found) == before and monitor.wait_max == 30


async def test_fairness_bound_counts_the_places_held_throughout(autojump_clock):
    """A request stuck in flight (a stalled reply) holds its place for the whole wait,
    so fewer places turn over: its age, not only the service times of the requests that
    left, sets the bound.  (Under load, the bound without it fired on fair runs.)"""
    found: list[tuple[str, str, str, str]] = []
    monitor = FairnessMonitor(2, lambda *v: found.append(v))
    stuck_may_leave = trio.Event()

    async def stuck() -> None:
        monitor.entered(0)
        await stuck_may_leave.wait()
        monitor.left()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck)
        nursery.start_soon(served_for, monitor, 1)
        await trio.sleep(0.5)
        token = monitor.parked()  # both places taken: wait
        await trio.sleep(9.5)  # the short one left long ago; the place went elsewhere
        nursery.start_soon(served_for, monitor, 1)
        await trio.sleep(1)
        monitor.granted(token)  # after 10 s: 1 round of the stuck request's 10.5 s
        stuck_may_leave.set()
    assert found == [], found
    # The same wait with nothing held throughout breaks the bound.
    token = monitor.parked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(served_for, monitor, 1)
    await trio.sleep(9)
    monitor.granted(token)
    assert len(found) == 1 and "waited 10.00 s" in found[0][2]


async def test_fairness_bound_while_reconnecting_has_one_place(autojump_clock):
    """While the device reconnects, the rule admits one request at a time: five others
    served in turn, a second each, are a fair 5 s wait, not 2 rounds of 4 places."""
    found: list[tuple[str, str, str, str]] = []
    connected = False
    monitor = FairnessMonitor(4, lambda *v: found.append(v),
                              places=lambda: 4 if connected else 1)

    async def wait_while_five_are_served_in_turn() -> None:
        token = monitor.parked()
        for _ in range(5):
            await served_for(monitor, 1)
        monitor.granted(token)

    await wait_while_five_are_served_in_turn()
    assert found == [] and monitor.wait_max == 5
    connected = True  # the same wait with four places is too long
    await wait_while_five_are_served_in_turn()
    assert len(found) == 1 and "2 round(s)" in found[0][1]


async def test_fairness_wait_ends_when_the_place_is_handed_over(autojump_clock):
    """A busy machine may run a woken waiter late: its wait ends at the hand-over."""
    found: list[tuple[str, str, str, str]] = []
    monitor = FairnessMonitor(1, lambda *v: found.append(v))
    token = monitor.parked()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(served_for, monitor, 1)
    monitor.handed_over(trio.lowlevel.current_task())  # as Admission.grant does, at 1 s
    await trio.sleep(20)  # the wake-up comes late
    monitor.granted(token)
    assert found == [] and monitor.wait_max == 1


async def test_availability_explains_a_delay_only_when_faults_cover_all_of_it(
        autojump_clock):
    """Faults one after another (a kill until the server is back, a stall, connections
    broken) may cover a whole reconnect delay; one moment left uncovered may not."""
    away = Availability(slack=1.0, horizon=20)
    away.down()  # killed at 0 ...
    await trio.sleep(3)
    assert away.unreachable_throughout(3)  # (still down: covered up to now)
    away.up()  # ... back at 3: away until 4
    await trio.sleep(0.5)
    away.broken(2.0)  # a stall at 3.5: away until 6.5
    await trio.sleep(3)
    away.broken()  # a reset at 6.5: away until 7.5
    await trio.sleep(1)
    assert away.unreachable_throughout(7.5)
    assert not away.unreachable_throughout(8)  # nothing before 0
    await trio.sleep(0.5)  # 8: the server has been reachable since 7.5
    assert not away.unreachable_throughout(7.5)
    away.broken()
    await trio.sleep(0.4)
    assert away.unreachable_throughout(0.4) and not away.unreachable_throughout(0.6)
    # 8.4: reachable in [7.5, 8] only, and before 0 (nothing recorded there)
    assert away.reachable_for(8.4) == pytest.approx(0.5)
    assert away.reachable_for(10.4) == pytest.approx(2.5)
    await trio.sleep(1)  # 9.4: reachable since 9
    assert away.reachable_for(9.4) == pytest.approx(0.9)
    await trio.sleep(30)  # past the horizon: the old intervals are forgotten
    away.broken()
    assert len(away._intervals) == 1


def test_memory_monitor_budget_follows_the_requests_in_flight():
    found: list[tuple[str, str, str, str]] = []
    memory = MemoryMonitor(10 * MiB, lambda *v: found.append(v))
    memory.holding(4 * MiB)
    memory.holding(1 * MiB)
    assert memory.budget == 18 * MiB  # 2 x the peak held + the allowance
    memory.start()
    memory.baseline -= 64 * MiB  # as if we had grown by 64 MiB since the start
    memory.sample()
    memory.sample()
    assert len(found) == 1 and found[0][3] == "memory"  # reported once


def test_step_timer_keeps_the_longest_step():
    timer = StepTimer()
    timer.after_task_step(None)  # type: ignore[arg-type]  # added mid-step: ignored
    assert timer.take() == (0.0, "")
