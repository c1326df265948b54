"""One fuzz run: orchestration of a server, the fault proxy, a device and a workload.

Theory of operation
-------------------
A run starts a server on a temporary file (:mod:`~blockdrv.fuzz.harness`), puts a
:class:`~blockdrv.fuzz.proxy.FaultProxy` in front of it and opens a device on the proxy
with a ``reconnect_delay`` longer than any outage the run causes.  Then, concurrently:

- ``concurrency`` workers (by default four times ``max_in_flight``, so admission always
  has a queue) take operations from a seeded schedule (reads, writes, zeroes, trims,
  flushes, block status; some with a cancellation deadline, some large writes cancelled
  while their payload goes out), lock their byte range so no two overlapping operations
  are in flight, run them with a time bound, and hand the outcome to the
  :class:`~blockdrv.fuzz.oracle.Oracle`, which checks it against the model;
- the :class:`~blockdrv.fuzz.injectors.Injector`'s fault and chaos tasks;
- a supervisor that reopens the device after a protocol-breaking fault has (rightly)
  killed it, and judges each expiry of the reconnect delay when it happens: only faults
  that kept the server unreachable for all of the delay explain one
  (:mod:`~blockdrv.fuzz.availability`);
- the monitors (:mod:`~blockdrv.fuzz.monitors`): event-loop liveness, memory, fairness;
  and a watchdog that turns any hang into a report with every task's position.

At the end every fault is cleared, the server brought back, and the whole disk read back
against the model; no file descriptor or child process may be left behind.  Everything
the run did goes to a trace (a file), so a violation comes with a reproducer.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import trio
from trio_util import AsyncValue

from ..nbd import Device, MultiConnDevice, NBDDevice, State, open_nbd
from ..protocol.errors import ConnectionLostError, NBDError, ProtocolError, RequestError
from ..util.taskgroups import first_failure
from .availability import Availability
from .config import PROTOCOL_BREAKING, FuzzConfig, MiB
from .harness import ServerHarness, make_server
from .injectors import Injector
from .model import Model, RangeLocks
from .monitors import FairnessMonitor, LoopMonitor, MemoryMonitor
from .oracle import Circumstances, Oracle
from .proxy import FaultProxy
from .records import FuzzResult, Op, Violation
from .servers import sparse_image
from .watchdog import Watchdog

RETRY_MAX = 1.0  # the device's longest wait between connection attempts
OP_KINDS = ("read", "write", "zero", "trim", "flush", "block_status")
_OP_WEIGHTS = (35, 35, 8, 7, 5, 10)


class _Schedule:
    """The seeded operations (or the recorded ones, when replaying)."""

    def __init__(self, config: FuzzConfig, replay: list[dict[str, Any]] | None) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.index = 0
        self._replay = ([Op(**e["op"]) for e in replay if "op" in e]
                        if replay is not None else None)

    def next(self, elapsed: float) -> Op | None:
        config = self.config
        if self._replay is not None:
            if self.index >= len(self._replay):
                return None
            op = self._replay[self.index]
            self.index += 1
            return op
        if config.ops is not None and self.index >= config.ops:
            return None
        if config.duration is not None and elapsed >= config.duration:
            return None
        rng, block = self.rng, config.block
        blocks = config.size // block
        if "cancel-write" in config.faults and rng.random() < 0.02:
            n = min(rng.randint(1, config.cancel_write_size // block), blocks // 4)
            op = Op(self.index, "write", rng.randrange(0, blocks - n + 1) * block, n * block,
                    round(rng.uniform(0.0002, 0.01), 5))
            self.index += 1
            return op
        kind = rng.choices(OP_KINDS, _OP_WEIGHTS)[0]
        if kind == "flush":
            offset = length = 0
        else:
            n = rng.randint(1, 32) if rng.random() < 0.95 else rng.randint(64, 512)
            n = min(n, blocks)
            offset = rng.randrange(0, blocks - n + 1) * block
            length = n * block
        cancel = None
        if "cancel" in config.faults and rng.random() < 0.03:
            cancel = rng.choice([0.0, 0.0005, 0.002, 0.01, 0.05])
        op = Op(self.index, kind, offset, length, cancel)
        self.index += 1
        return op


def _data_for(op: Op) -> bytes:
    """The bytes an operation writes: a function of its index and offset."""
    return random.Random(op.index * 7919 + op.offset).randbytes(op.length)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _places(member: NBDDevice, max_in_flight: int) -> int:
    """How many requests ``member`` admits at once now (one while reconnecting)."""
    return max_in_flight if member.state is State.CONNECTED else 1


def _members(device: Device) -> tuple[NBDDevice, ...]:
    return device.members if isinstance(device, MultiConnDevice) else (device,)


class FuzzRun:
    """Drive one run; see the module docstring."""

    def __init__(self, config: FuzzConfig, *, replay: list[dict[str, Any]] | None = None,
                 on_progress: Callable[[int, float], None] | None = None) -> None:
        self.config = config
        self.result = FuzzResult(config)
        self.model = Model(config.size, config.block)
        self.oracle = Oracle(config, self.model, self.report)
        self.locks = RangeLocks()
        self.schedule = _Schedule(config, replay)
        self.replay_faults = [e for e in (replay or []) if "fault" in e]
        self.replaying = replay is not None
        self.on_progress = on_progress
        self.injector = Injector(self)
        self.device_value: AsyncValue[Device | None] = AsyncValue(None)
        self.generation = 0
        self.faults_at_open: dict[int, int] = {}  # generation -> protocol faults then
        self.cancel_scopes: dict[int, trio.CancelScope] = {}
        self.running: dict[int, float] = {}  # op index -> start, oldest first
        self.held = 0  # bytes of the operations in flight
        self.fairness: list[FairnessMonitor] = []  # the open device's (they refer to it)
        self._expiries_judged: dict[NBDDevice, int] = {}  # member -> delay expiries seen
        self.loop = LoopMonitor(config.lag_limit, self.report, self.elapsed)
        self.memory = MemoryMonitor(config.rss_allowance, self.report)
        # A fault keeps the device away for its own length, plus one retry interval and
        # one handshake (a loaded machine may need a second for that).
        self.availability = Availability(slack=RETRY_MAX + 2.0,
                                         horizon=config.reconnect_delay + 1)
        self.loop.memory = self.memory
        self.start = 0.0
        self.watchdog: Watchdog
        self.done = trio.Event()
        self._dead: tuple[int, trio.Event] = (0, trio.Event())  # (generation, its event)
        self._harness: ServerHarness | None = None
        self._proxy: FaultProxy | None = None

    @property
    def harness(self) -> ServerHarness:
        assert self._harness is not None
        return self._harness

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None
        return self._proxy

    @property
    def device(self) -> Device | None:
        return self.device_value.value  # type: ignore[no-any-return]

    def elapsed(self) -> float:
        return trio.current_time() - self.start

    def record(self, entry: dict[str, Any]) -> None:
        self.result.trace.add({"t": round(self.elapsed(), 4), **entry})

    def report(self, operation: str, expected: str, found: str, invariant: str = "") -> None:
        violation = Violation(operation, expected, found, round(self.elapsed(), 3), invariant)
        self.result.violations.append(violation)
        self.record({"violation": asdict(violation)})

    # --- the whole run ------------------------------------------------------------------

    async def run(self) -> FuzzResult:
        """Run the workload; a failure outside it (the server cannot start, ...) is
        raised as itself, never in a task group."""
        fds_before = _fd_count()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="blockdrv-fuzz-") as tmp:
            directory = Path(tmp)
            image = sparse_image(directory / "disk.img", self.config.size)
            self._harness = ServerHarness(make_server(self.config, directory, image),
                                          self._server_crashed, self.availability)
            try:
                await self.harness.start()
                self._proxy = FaultProxy(self.harness.address, directory)
                self.proxy.capture = "duplicate" in self.config.faults
                self.proxy.flood_bytes = self.config.flood_bytes
                self.proxy.availability = self.availability
                self.proxy.rng = random.Random(self.config.seed + 2)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.proxy.serve)
                    await self._run_with_proxy()
                    self.proxy.close()
            except BaseExceptionGroup as group:
                raise first_failure(group) from None
            finally:
                self.harness.stop()
        result = self.result
        result.elapsed = time.monotonic() - started
        result.faults_by_kind.update(self._proxy.injected if self._proxy else {})
        result.server_crashes = list(self._harness.crashes) if self._harness else []
        result.loop_lag_max = self.loop.lag_max
        result.step_cpu_max = self.loop.steps.worst
        result.rss_peak = self.memory.peak
        result.rss_growth_peak = self.memory.growth_peak
        self._fold_fairness()
        leaked = _fd_count() - fds_before
        if leaked > 0:
            self.report("end of run", "no file descriptor left open",
                        f"{leaked} more open than before the run", "cleanup")
        return result

    async def _run_with_proxy(self) -> None:
        self.start = trio.current_time()
        config = self.config
        async with trio.open_nursery() as inner:
            # Nothing may stand still longer than an operation's bound plus an outage.
            self.watchdog = Watchdog(config.bound + config.max_outage + 30,
                                     inner.cancel_scope, self._hung)
            inner.start_soon(self.watchdog.run)
            inner.start_soon(self.loop.run)
            inner.start_soon(self.harness.watch, self.elapsed)
            inner.start_soon(self._supervise)
            await self._current_device()
            self.memory.start()
            async with trio.open_nursery() as workload:
                if not self.replaying:
                    workload.start_soon(self.injector.fault_task)
                    workload.start_soon(self.injector.chaos_task)
                else:
                    workload.start_soon(self.injector.replay, self.replay_faults)
                async with trio.open_nursery() as workers:
                    for _ in range(config.workers):
                        workers.start_soon(self._worker)
                if not self.replaying:
                    workload.cancel_scope.cancel()  # the workload is over: so are the faults
                # (A replay injects every fault of its trace, at its time, even when the
                # operations ran faster than the first time and are over already.)
            await self._heal()
            await self._final_check()
            self.watchdog.stop()
            self.done.set()
            self._declare_dead(self.generation)  # let the supervisor close the device
            inner.cancel_scope.cancel()

    def _server_crashed(self, how: str) -> None:
        self.record({"fault": "server-crash", "params": {"how": how}})

    def _hung(self, tasks: list[str]) -> None:
        self.report("the run", f"progress at least every {self.watchdog.limit:g}s "
                    "(no hang anywhere)",
                    "nothing moved; tasks were waiting at:\n" + "\n".join(tasks), "deadline")

    # --- the device -----------------------------------------------------------------------

    def _protocol_faults(self) -> int:
        injected = self.proxy.injected
        return sum(injected[kind] for kind in PROTOCOL_BREAKING)

    async def _supervise(self) -> None:
        """Keep a device open; reopen it after a protocol-breaking fault killed it."""
        while True:
            faults_before = self._protocol_faults()
            started = trio.current_time()
            try:
                await self._one_device()
            except NBDError as exc:  # could not (re)open
                if isinstance(exc, ProtocolError) and self._protocol_faults() > faults_before:
                    pass  # a protocol-breaking fault met the handshake
                elif self.availability.unreachable_throughout(self.config.reconnect_delay):
                    self.record({"event": "open timed out: the server was unreachable "
                                          "throughout"})
                else:
                    self.report("open the device", "opened within reconnect_delay "
                                f"({self.config.reconnect_delay:g}s)",
                                f"{exc}; server log: {self.harness.log()[-800:]!r}", "open")
            took = trio.current_time() - started
            if self.generation == 0 and took > self.config.reconnect_delay + 2:
                self.report("open the device", f"done within open_timeout "
                            f"({self.config.reconnect_delay:g}s) + 2s",
                            f"took {took:.1f}s", "deadline")
            if self.done.is_set():
                return
            self.result.reopens += 1

    async def _one_device(self) -> None:
        config = self.config
        async with open_nbd(self.proxy.address, reconnect_delay=config.reconnect_delay,
                            open_timeout=config.reconnect_delay,
                            retry_initial=0.1, retry_max=RETRY_MAX,
                            max_in_flight=config.max_in_flight,
                            connections=config.connections, structured=config.structured,
                            cancel_timeout=config.cancel_timeout) as device:
            self.generation += 1
            dead = trio.Event()
            self._dead = (self.generation, dead)
            self.faults_at_open[self.generation] = self._protocol_faults()
            for member in _members(device):
                monitor = FairnessMonitor(config.max_in_flight, self.report,
                                          places=partial(_places, member,
                                                         config.max_in_flight))
                member.monitor_admission(monitor)
                self.fairness.append(monitor)
            self.injector.filters = []
            self.device_value.value = device
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_quit, device, self.generation)
                    for member in _members(device):
                        nursery.start_soon(self._judge_delay_expiries, member)
                    await dead.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._account(device)
                if self.device_value.value is device:
                    self.device_value.value = None  # closed: nothing keeps it

    def _fold_fairness(self) -> None:
        """Keep the figures of the closed device's fairness monitors, not the monitors
        (they refer to the device: kept, every reopened device would stay in memory)."""
        result = self.result
        for monitor in self.fairness:
            result.admission_wait_max = max(result.admission_wait_max, monitor.wait_max)
            result.admission_overtakes += monitor.overtakes
        self.fairness.clear()

    def _account(self, device: Device) -> None:
        self._fold_fairness()
        stats = device.statistics()
        self.result.reconnects += stats.reconnects
        # Large writes cancelled while their payload was going out, finished in time.
        self.result.faults_by_kind["cancel-write"] += stats.sends_finished_cancelled
        judged = sum(self._expiries_judged.pop(member, 0) for member in _members(device))
        if stats.reconnect_delay_expired > judged:  # (expired as the device closed)
            self._delay_expired(stats.reconnect_delay_expired - judged)

    async def _judge_delay_expiries(self, member: NBDDevice) -> None:
        """Judge each expiry of ``member``'s reconnect delay as it happens."""
        while True:
            await member.wait_state(State.CONNECTING_NOWAIT)
            expired = member.statistics().reconnect_delay_expired
            judged = self._expiries_judged.get(member, 0)
            if expired > judged:
                self._expiries_judged[member] = expired
                self._delay_expired(expired - judged)
            await member.wait_state(State.CONNECTED, State.CONNECTING_WAIT, State.QUIT)

    def _delay_expired(self, times: int) -> None:
        delay = self.config.reconnect_delay
        if self.availability.unreachable_throughout(delay):
            self.result.delay_expiries_explained += times
            self.record({"event": f"reconnect_delay expired {times} time(s): the server "
                                  "was unreachable throughout"})
        else:
            self.report("reconnect", f"back within reconnect_delay ({delay:g}s), the "
                        "faults having left the server reachable for part of it",
                        f"the delay expired {times} time(s)", "no unexplained failure")

    def _declare_dead(self, generation: int) -> None:
        """Device ``generation`` is dead: the supervisor replaces it (only that one: a
        late failure of an older device must not close a newer one)."""
        current, event = self._dead
        if current == generation:
            event.set()

    async def _watch_quit(self, device: Device, generation: int) -> None:
        await device.wait_state(State.QUIT)
        self._declare_dead(generation)

    async def _current_device(self) -> Device:
        """The open device (waits while the supervisor reopens a dead one)."""
        device: Device = await self.device_value.wait_value(
            lambda d: d is not None and d.state is not State.QUIT)
        return device

    # --- workers ------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            op = self.schedule.next(self.elapsed())
            if op is None:
                return
            self.record({"op": asdict(op)})
            span = await self.locks.acquire(op.offset, op.length)
            try:
                await self._run_op(op)
            finally:
                self.locks.release(span)
            if self.on_progress is not None:
                self.on_progress(self.result.ops_total, self.elapsed())

    async def _run_op(self, op: Op) -> None:
        device = await self._current_device()
        if op.kind == "block_status" and not device.info.can_block_status:
            op = replace(op, kind="read")  # (no structured replies: no block status)
        generation, cancels = self.generation, self.injector.cancels_in_flight
        started = trio.current_time()
        scope = trio.CancelScope()
        if op.cancel_after is not None:
            scope.deadline = started + op.cancel_after
        self.cancel_scopes[op.index] = scope
        self.running[op.index] = started
        self.held += op.length
        self.memory.holding(self.held)
        data = _data_for(op) if op.kind == "write" else None
        outcome: Exception | None = None
        result: Any = None
        try:
            with trio.move_on_after(self.config.bound) as bound, scope:
                result = await self._call(device, op, data)
        except Exception as exc:
            outcome = exc
        finally:
            self.cancel_scopes.pop(op.index, None)
            del self.running[op.index]
            self.held -= op.length
        took = trio.current_time() - started
        self.result.latencies.append(took)
        self.result.ops_by_kind[op.kind] += 1
        self.watchdog.progress()
        cancelled = scope.cancelled_caught
        hung = bound.cancelled_caught
        self.oracle.duration(op, took, hung=hung, cancelled=cancelled,
                             reachable=self.availability.reachable_for(took) if hung
                             else math.inf)  # (only a hang needs it)
        if bound.cancelled_caught:
            self.oracle.unknown(op)
            return
        if cancelled and outcome is None:
            self.result.faults_by_kind["cancel"] += 1
            self.oracle.unknown(op)
            return
        if outcome is None:
            self.oracle.succeeded(op, result, data)
            return
        self.result.failures_by_kind[type(outcome).__name__] += 1
        if isinstance(outcome, RequestError) and "error" in self.config.faults:
            self.result.faults_by_kind["error"] += 1
        around = Circumstances(
            protocol_faults=self._protocol_faults() - self.faults_at_open[generation],
            errors_injected="error" in self.config.faults,
            cancel_in_flight=(self.injector.cancels_in_flight != cancels
                              or (device.state is State.CONNECTING_NOWAIT
                                  and self.injector.cancels_in_flight > 0)),
            state=device.state,
            delay_expired=bool(device.statistics().reconnect_delay_expired),
            unreachable_throughout=self.availability.unreachable_throughout(
                self.config.reconnect_delay))
        reason = self.oracle.failed(op, outcome, around)
        if reason is not None and isinstance(outcome, ProtocolError):
            self._declare_dead(generation)  # at once, not when _watch_quit next runs
        elif isinstance(outcome, ConnectionLostError) and device.state is not State.QUIT:
            # Requests fail fast until the worker reconnects: wait for it, as a user would.
            with trio.move_on_after(self.config.bound):
                try:
                    await device.wait_connected()
                except ConnectionLostError:
                    pass

    async def _call(self, device: Device, op: Op, data: bytes | None) -> Any:
        if op.kind == "read":
            return await device.pread(op.length, op.offset)
        if op.kind == "write":
            assert data is not None
            await device.pwrite(data, op.offset)
        elif op.kind == "zero":
            await device.zero(op.length, op.offset, may_trim=op.index % 2 == 0)
        elif op.kind == "trim":
            await device.trim(op.length, op.offset)
        elif op.kind == "flush":
            await device.flush()
        elif op.kind == "block_status":
            return await device.block_status(op.length, op.offset)
        return None

    # --- the end ------------------------------------------------------------------------

    async def _heal(self) -> None:
        """Stop every fault and bring the server back, for the final check."""
        self.proxy.clear()
        if not self.harness.running:
            await self.harness.restart()
        device = self.device
        if device is not None and device.state is not State.QUIT:
            await self.injector.remove_filters()

    async def _final_check(self) -> None:
        """Read the whole disk back: every acknowledged write must still be there."""
        step = 4 * MiB
        bound = self.config.bound
        for offset in range(0, self.config.size, step):
            n = min(step, self.config.size - offset)
            for _attempt in range(3):
                device = await self._current_device()
                try:
                    with trio.fail_after(bound):
                        await device.wait_connected()
                        data = await device.pread(n, offset)
                except (ProtocolError, ConnectionLostError, RequestError):
                    continue  # a reply broken by a fault still in the pipe: try again
                except trio.TooSlowError:
                    self.report(f"final read {offset}+{n}", f"done within {bound:g}s",
                                "a hang", "deadline")
                    break
                self.watchdog.progress()
                self.oracle.succeeded(Op(-1, "read", offset, n), data, None)
                break
            else:
                self.report(f"final read {offset}+{n}", "a successful read",
                            "failed three times", "data")
