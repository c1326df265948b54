"""One fuzz run: a server, the fault proxy, a device, a seeded workload, and the checks.

Theory of operation
-------------------
A run starts a server on a temporary file (the embedded server in a subprocess,
nbdkit, qemu-nbd, or any command), puts a :class:`~blockdrv.fuzz.proxy.FaultProxy` in
front of it and opens a device on the proxy with a ``reconnect_delay`` longer than any
outage the run causes.  Then, concurrently:

- ``concurrency`` workers take operations from a seeded schedule (reads, writes, zeroes,
  trims, flushes, block status; some with a cancellation deadline), lock their byte
  range so no two overlapping operations are in flight, run them with a time bound, and
  check the outcome against the :class:`~blockdrv.fuzz.model.Model`;
- the *fault task* injects, at seeded random moments: server kill -9 and restart after
  an outage, proxy cuts in either direction, resets, stalls, delays, malformed reply
  headers;
- the *chaos task* takes drained sections, inserts and removes filters, cancels
  operations, and calls ``cancel_in_flight()``;
- a *supervisor* reopens the device after a malformed reply has (rightly) killed it.

The invariants checked, operation by operation:

1. a successful read returns what the model holds (known blocks);
2. acknowledged writes survive kills and restarts (the model is never reset, and the
   whole disk is read back at the end);
3. with outages shorter than ``reconnect_delay``, no request fails: a failure is only
   accepted when something explains it (an injected error, a malformed reply, a
   ``cancel_in_flight()`` while reconnecting, our own cancellation);
4. no request runs past its bound (``reconnect_delay`` + the longest stall + a margin);
5. drained sections and graph changes never fail or cancel a request (they are not
   accepted as explanations);
6. malformed replies end in ProtocolError, never in wrong data (checked by 1);
7. nothing is left running: the run's file descriptors and child processes are gone.

A server process that dies on its own (not killed by a fault) is a finding about the
server, not the driver: a watcher waits for the process's exit (a pidfd, no polling),
records it in :attr:`FuzzResult.server_crashes` with the server's log, and restarts the
server at once, as a supervisor would; for the driver that is one more outage, and the
invariants still hold.

A failed or cancelled write makes its range unknown in the model; that is not a
violation.  Everything the run did (operations and faults, with their times) is kept in
:attr:`FuzzResult.trace`, so a violation comes with a reproducer.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio
from trio_util import AsyncValue

from ..block import (
    FaultFilter,
    FilterNode,
    ThrottleFilter,
    TraceFilter,
    insert_filter,
    remove_filter,
)
from ..latency import quantile, quantiles
from ..nbd import Device, State, open_nbd
from ..protocol.errors import ConnectionLostError, NBDError, ProtocolError, RequestError
from ..server.faults import MALFORMED_KINDS
from ..taskgroups import first_failure
from .model import Model, RangeLocks
from .proxy import TO_CLIENT, TO_SERVER, FaultProxy
from .servers import CommandServer, Peer, file_server, sparse_image
from .watchdog import Watchdog

MiB = 1024 * 1024

NETWORK_FAULTS = ("kill", "cut", "reset", "stall", "delay", "malformed")
CLIENT_FAULTS = ("drain", "graph", "cancel", "cancel-in-flight")
SERVER_FAULTS = ("error", "reorder")
CHECKER_FAULTS = ("lose-writes", "stale-reads")  # make a correct checker fail
DEFAULT_FAULTS = NETWORK_FAULTS + CLIENT_FAULTS + SERVER_FAULTS
ALL_FAULTS = DEFAULT_FAULTS + CHECKER_FAULTS
SERVER_KINDS = ("embedded", "nbdkit", "qemu-nbd")
OP_KINDS = ("read", "write", "zero", "trim", "flush", "block_status")
_OP_WEIGHTS = (35, 35, 8, 7, 5, 10)
_WRITING = ("write", "zero", "trim")


@dataclass
class FuzzConfig:
    server: str = "embedded"
    server_cmd: str | None = None
    seed: int = 0
    duration: float | None = None
    ops: int | None = None
    concurrency: int = 8
    faults: tuple[str, ...] = DEFAULT_FAULTS
    reconnect_delay: float = 15.0
    size: int = 64 * MiB
    block: int = 4096
    fault_interval: float = 1.0  # mean seconds between network faults
    max_outage: float = 3.0
    max_stall: float = 2.0
    max_in_flight: int = 16
    connections: int = 1  # > 1: a multi-conn device (when the server offers it)

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; "
                             f"choose from {', '.join(ALL_FAULTS)}")
        if self.server not in SERVER_KINDS and self.server_cmd is None:
            raise ValueError(f"--server must be one of {', '.join(SERVER_KINDS)}")
        if self.size % self.block or self.size < 64 * self.block:
            raise ValueError(f"size must be a multiple of {self.block} and at least "
                             f"{64 * self.block}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.max_outage + 2 >= self.reconnect_delay:
            raise ValueError(f"reconnect_delay ({self.reconnect_delay}s) must exceed the "
                             f"longest outage ({self.max_outage}s) by more than 2s")
        if self.duration is None and self.ops is None:
            self.duration = 30.0

    @property
    def bound(self) -> float:
        """Longest time one operation may take before it counts as a hang."""
        return self.reconnect_delay + self.max_stall + 10.0


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    offset: int
    length: int
    cancel_after: float | None = None  # we cancel it after this many seconds

    def describe(self) -> str:
        if self.kind == "flush":
            return f"#{self.index} flush"
        return f"#{self.index} {self.kind} {self.offset}+{self.length}"


@dataclass(frozen=True)
class Violation:
    operation: str
    expected: str
    found: str


@dataclass
class FuzzResult:
    config: FuzzConfig
    ops_by_kind: Counter[str] = field(default_factory=Counter)
    failures_by_kind: Counter[str] = field(default_factory=Counter)
    faults_by_kind: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    reopens: int = 0
    drains: int = 0
    graph_changes: int = 0
    latencies: list[float] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    elapsed: float = 0.0
    trace: list[dict[str, Any]] = field(default_factory=list)
    server_crashes: list[str] = field(default_factory=list)  # how, and the server's log

    @property
    def ok(self) -> bool:
        """No invariant of the driver was violated (server crashes are reported apart)."""
        return not self.violations

    @property
    def ops_total(self) -> int:
        return sum(self.ops_by_kind.values())

    def latency(self, q: float) -> float:
        return quantile(self.latencies, q)

    def summary(self) -> dict[str, Any]:
        """The figures as ``--json`` writes them."""
        ordered = sorted(self.latencies)  # once: the figures below re-sort it in O(n)
        p50, p99 = quantiles(ordered, (0.5, 0.99))
        return {
            "seed": self.config.seed,
            "server": self.config.server_cmd or self.config.server,
            "elapsed": round(self.elapsed, 3),
            "ops_total": self.ops_total,
            "ops_by_kind": dict(self.ops_by_kind),
            "failures_by_kind": dict(self.failures_by_kind),
            "faults_injected": sum(self.faults_by_kind.values()),
            "faults_by_kind": dict(self.faults_by_kind),
            "reconnects": self.reconnects,
            "reopens": self.reopens,
            "drains": self.drains,
            "graph_changes": self.graph_changes,
            "latency": {"p50": p50, "p99": p99,
                        "max": ordered[-1] if ordered else 0.0,
                        "median": statistics.median(ordered) if ordered else 0.0},
            "violations": [asdict(v) for v in self.violations],
            "server_crashes": self.server_crashes,
        }

    def reproducer(self) -> dict[str, Any]:
        """Seed, configuration and the trace of operations and faults (for --replay)."""
        return {"config": asdict(self.config), "trace": self.trace}


def load_reproducer(path: str | Path) -> tuple[FuzzConfig, list[dict[str, Any]]]:
    raw = json.loads(Path(path).read_text())
    config = raw["config"]
    config["faults"] = tuple(config["faults"])
    return FuzzConfig(**config), raw["trace"]


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
        kind = rng.choices(OP_KINDS, _OP_WEIGHTS)[0]
        blocks = config.size // block
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
    """The bytes an operation writes: a function of its index and the run's seed."""
    return random.Random(op.index * 7919 + op.offset).randbytes(op.length)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class FuzzRun:
    """Drive one run; see the module docstring."""

    def __init__(self, config: FuzzConfig, *, replay: list[dict[str, Any]] | None = None,
                 on_progress: Callable[[int, float], None] | None = None) -> None:
        self.config = config
        self.result = FuzzResult(config)
        self.model = Model(config.size, config.block)
        self.locks = RangeLocks()
        self.schedule = _Schedule(config, replay)
        self.replay_faults = [e for e in (replay or []) if "fault" in e]
        self.replaying = replay is not None
        self.on_progress = on_progress
        self.rng = random.Random(config.seed + 1)
        self.device_value: AsyncValue = AsyncValue(None)  # the open device, replaced on reopen
        self.generation = 0
        self.malformed_at_open: dict[int, int] = {}  # generation -> proxy's count then
        self.cancels_in_flight = 0  # cancel_in_flight() calls so far
        self.cancel_scopes: dict[int, trio.CancelScope] = {}
        self.filters: list[FilterNode] = []
        self.server: Peer | None = None
        self.proxy: FaultProxy | None = None
        self.start = 0.0
        self.watchdog: Watchdog
        self.done = trio.Event()
        self.server_starts = AsyncValue(0)  # restarts by the fault task (for the watcher)
        self._dead: tuple[int, trio.Event] = (0, trio.Event())  # (generation, its event)

    # --- the whole run ------------------------------------------------------------------

    async def run(self) -> FuzzResult:
        """Run the workload; a failure outside it (the server cannot start, ...) is
        raised as itself, never in a task group."""
        fds_before = _fd_count()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="blockdrv-fuzz-") as tmp:
            directory = Path(tmp)
            image = sparse_image(directory / "disk.img", self.config.size)
            self.server = self._make_server(directory, image)
            try:
                self.server.start()
                await self.server.wait_ready()
                self.proxy = FaultProxy(self._server_address(), directory)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.proxy.serve)
                    await self._run_with_proxy(nursery)
                    self.proxy.close()
            except BaseExceptionGroup as group:
                raise first_failure(group) from None
            finally:
                self.server.stop()
        self.result.elapsed = time.monotonic() - started
        self.result.faults_by_kind.update(self.proxy.injected if self.proxy else {})
        leaked = _fd_count() - fds_before
        if leaked > 0:
            self._violation("end of run", "no file descriptor left open",
                            f"{leaked} more open than before the run")
        return self.result

    def _make_server(self, directory: Path, image: Path) -> Peer:
        config = self.config
        (directory / "server").mkdir()
        where = directory / "server"
        if config.server_cmd:
            return CommandServer(where, config.server_cmd, image)
        if config.server != "embedded":
            return file_server(config.server, where, image)
        args = ["--seed", str(config.seed)]  # the embedded server's own fault hooks
        if "reorder" in config.faults:
            args.append("--shuffle-replies")
        if "error" in config.faults:
            args += ["--fail", "read:EIO:0.003", "--fail", "write:EIO:0.003"]
        if "lose-writes" in config.faults:
            args += ["--lose-writes", "0.2"]
        if "stale-reads" in config.faults:
            args += ["--stale-reads", "0.3"]
        return file_server("embedded", where, image, *args)

    def _server_address(self) -> Any:
        from ..protocol.uri import parse_uri

        assert self.server is not None
        return parse_uri(self.server.uri())

    @property
    def device(self) -> Device | None:
        return self.device_value.value  # type: ignore[no-any-return]

    async def _run_with_proxy(self, nursery: trio.Nursery) -> None:
        assert self.proxy is not None
        self.start = trio.current_time()
        async with trio.open_nursery() as inner:
            # Nothing may stand still longer than an operation's bound plus an outage.
            self.watchdog = Watchdog(self.config.bound + self.config.max_outage + 30,
                                     inner.cancel_scope, self._hung)
            inner.start_soon(self.watchdog.run)
            inner.start_soon(self._watch_server)
            inner.start_soon(self._supervise)
            await self._current_device()
            async with trio.open_nursery() as workload:
                if not self.replaying:
                    workload.start_soon(self._fault_task)
                    workload.start_soon(self._chaos_task)
                else:
                    workload.start_soon(self._replay_faults)
                async with trio.open_nursery() as workers:
                    for _ in range(self.config.concurrency):
                        workers.start_soon(self._worker)
                workload.cancel_scope.cancel()  # the workload is over: so are the faults
            await self._heal()
            await self._final_check()
            self.watchdog.stop()
            self.done.set()
            self._declare_dead(self.generation)  # let the supervisor close the device
            inner.cancel_scope.cancel()

    async def _watch_server(self) -> None:
        """Report and restart the server when it dies without being killed by a fault."""
        server = self.server
        assert server is not None
        quick = 0  # crashes in a row less than a second after a start
        while True:
            starts = self.server_starts.value
            process = server.process
            if process is not None:
                started = trio.current_time()
                await _process_exit(process)
                if server.process is process and server.running:
                    self._server_crashed(process)
                    quick = quick + 1 if trio.current_time() - started < 1.0 else 0
                    if quick >= 3:  # it cannot even start: no point in going on
                        raise RuntimeError(f"the server keeps dying at start: "
                                           f"{self.result.server_crashes[-1]}")
                    server.kill()  # what is left of it: the listener
                    await self._restart_server()
                    continue
            await self.server_starts.wait_value(lambda n, seen=starts: n > seen)

    async def _restart_server(self) -> None:
        """Start the (killed) server again; the watcher then watches the new process."""
        assert self.server is not None
        self.server.start()
        self.server_starts.value += 1
        await self.server.wait_ready()

    def _server_crashed(self, process: Any) -> None:
        """Record that the server process died on its own (it has exited)."""
        assert self.server is not None
        code = process.poll()
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}")
        self.result.server_crashes.append(
            f"{self.server!r} died on its own at {self._elapsed():.1f}s ({how}); "
            f"its log ends: {self.server.log()[-1500:]!r}")
        self._record_fault("server-crash", {"how": how})

    def _hung(self, tasks: list[str]) -> None:
        self._violation("the run", "progress at least every "
                        f"{self.watchdog.limit:g}s (no hang anywhere)",
                        "nothing moved; tasks were waiting at:\n" + "\n".join(tasks))

    # --- the device -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep a device open; reopen it after a malformed reply killed it."""
        while True:
            try:
                await self._one_device()
            except NBDError as exc:  # could not (re)open: report, try again
                assert self.server is not None
                self._violation("open the device", "opened within reconnect_delay "
                                f"({self.config.reconnect_delay:g}s)",
                                f"{exc}; server log: {self.server.log()[-800:]!r}")
            if self.done.is_set():
                return
            self.result.reopens += 1

    async def _one_device(self) -> None:
        assert self.proxy is not None
        async with open_nbd(self.proxy.address, reconnect_delay=self.config.reconnect_delay,
                            open_timeout=self.config.reconnect_delay,
                            retry_initial=0.1, retry_max=1.0,
                            max_in_flight=self.config.max_in_flight,
                            connections=self.config.connections,
                            cancel_timeout=self.config.bound / 2) as device:
            self.generation += 1
            dead = trio.Event()
            self._dead = (self.generation, dead)
            self.malformed_at_open[self.generation] = self.proxy.injected["malformed"]
            self.filters = []
            self.device_value.value = device
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_quit, device, self.generation)
                    await dead.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._account(device)

    def _account(self, device: Device) -> None:
        stats = device.statistics()
        self.result.reconnects += stats.reconnects
        if stats.reconnect_delay_expired:
            self._violation("reconnect", f"back within reconnect_delay "
                            f"({self.config.reconnect_delay:g}s)",
                            f"the delay expired {stats.reconnect_delay_expired} time(s)")

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

    def _elapsed(self) -> float:
        return trio.current_time() - self.start

    async def _worker(self) -> None:
        while True:
            op = self.schedule.next(self._elapsed())
            if op is None:
                return
            self.result.trace.append({"t": round(self._elapsed(), 4), "op": asdict(op)})
            span = await self.locks.acquire(op.offset, op.length)
            try:
                await self._run_op(op)
            finally:
                self.locks.release(span)
            if self.on_progress is not None:
                self.on_progress(self.result.ops_total, self._elapsed())

    async def _run_op(self, op: Op) -> None:
        device = await self._current_device()
        generation, cancels = self.generation, self.cancels_in_flight
        started = trio.current_time()
        scope = trio.CancelScope()
        if op.cancel_after is not None:
            scope.deadline = started + op.cancel_after
        self.cancel_scopes[op.index] = scope
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
        self.result.latencies.append(trio.current_time() - started)
        self.result.ops_by_kind[op.kind] += 1
        self.watchdog.progress()
        if bound.cancelled_caught:
            self._violation(op.describe(), f"completion within {self.config.bound:g}s",
                            "still running: a hang")
            self._unknown(op)
            return
        if scope.cancelled_caught and outcome is None:
            self.result.faults_by_kind["cancel"] += 1
            self._unknown(op)
            return
        if outcome is None:
            self._check_success(op, result, data)
            return
        self.result.failures_by_kind[type(outcome).__name__] += 1
        if isinstance(outcome, RequestError) and "error" in self.config.faults:
            self.result.faults_by_kind["error"] += 1
        self._unknown(op)
        explained = self._explain(outcome, device, generation, cancels)
        if explained is None:
            self._violation(op.describe(), "success (nothing explains a failure)",
                            f"{type(outcome).__name__}: {outcome}")
        elif isinstance(outcome, ProtocolError):
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

    def _malformed_since_open(self, generation: int) -> bool:
        """A malformed reply was injected after device ``generation`` was opened."""
        assert self.proxy is not None
        return self.proxy.injected["malformed"] > self.malformed_at_open[generation]

    def _explain(self, exc: Exception, device: Device, generation: int,
                 cancels: int) -> str | None:
        """Why a failure is acceptable, or None (a violation).  Drains, graph changes
        and the reconnect delay expiring never explain one."""
        if isinstance(exc, ProtocolError):
            return "malformed reply" if self._malformed_since_open(generation) else None
        if isinstance(exc, RequestError):
            return "injected error" if "error" in self.config.faults else None
        if isinstance(exc, ConnectionLostError):
            if device.statistics().reconnect_delay_expired:
                return None
            if self.cancels_in_flight != cancels or (
                    device.state is State.CONNECTING_NOWAIT and self.cancels_in_flight):
                return "cancel_in_flight() while reconnecting"
            if device.state is State.QUIT and self._malformed_since_open(generation):
                return "the device died of a malformed reply"
            return None
        return None

    def _check_success(self, op: Op, result: Any, data: bytes | None) -> None:
        model = self.model
        if op.kind == "read":
            mismatch = model.check_read(op.offset, result)
            if mismatch is not None:
                self._violation(op.describe(),
                                f"block {mismatch.offset}: {mismatch.expected[:16].hex()}...",
                                f"{mismatch.found[:16].hex()}...")
        elif op.kind == "write":
            assert data is not None
            model.written(op.offset, data)
        elif op.kind == "zero":
            model.zeroed(op.offset, op.length)
        elif op.kind == "trim":
            model.unknown(op.offset, op.length)
        elif op.kind == "block_status":
            problem = model.check_extents(op.offset, op.length, result)
            if problem is not None:
                self._violation(op.describe(), "extents consistent with the data", problem)

    def _unknown(self, op: Op) -> None:
        if op.kind in _WRITING:
            self.model.unknown(op.offset, op.length)

    def _violation(self, operation: str, expected: str, found: str) -> None:
        self.result.violations.append(Violation(operation, expected, found))

    # --- faults ---------------------------------------------------------------------------

    def _record_fault(self, kind: str, params: dict[str, Any]) -> None:
        self.result.trace.append({"t": round(self._elapsed(), 4), "fault": kind,
                                  "params": params})

    async def _fault_task(self) -> None:
        kinds = [k for k in NETWORK_FAULTS if k in self.config.faults]
        if not kinds:
            return
        while True:
            await trio.sleep(self.rng.expovariate(1 / self.config.fault_interval))
            kind = self.rng.choice(kinds)
            await self._inject(kind, self._fault_params(kind))

    def _fault_params(self, kind: str) -> dict[str, Any]:
        rng, config = self.rng, self.config
        if kind == "kill":
            return {"outage": round(rng.uniform(0.1, config.max_outage), 3)}
        if kind == "cut":
            return {"direction": rng.choice([TO_SERVER, TO_CLIENT]),
                    "after": rng.choice([0, 1, 4, 13, 27, 28, 31, 32, rng.randrange(4096),
                                         rng.randrange(1 << 18)])}
        if kind == "stall":
            return {"seconds": round(rng.uniform(0.05, config.max_stall), 3)}
        if kind == "delay":
            return {"latency": round(rng.uniform(0.001, 0.02), 4),
                    "duration": round(rng.uniform(0.2, 2.0), 3)}
        if kind == "malformed":
            return {"kind": rng.choice(MALFORMED_KINDS)}
        return {}

    async def _inject(self, kind: str, params: dict[str, Any]) -> None:
        proxy, server = self.proxy, self.server
        assert proxy is not None and server is not None
        self._record_fault(kind, params)
        if kind == "kill":
            process = server.process
            if process is not None and process.poll() is not None:
                self._server_crashed(process)  # it died before we could kill it
            server.kill()
            self.result.faults_by_kind["kill"] += 1
            await trio.sleep(params["outage"])
            await self._restart_server()
        elif kind == "cut":
            proxy.cut(params["direction"], params["after"])
        elif kind == "reset":
            proxy.reset()
        elif kind == "stall":
            proxy.stall(params["seconds"])
        elif kind == "delay":
            proxy.delay(params["latency"], params["duration"])
        elif kind == "malformed":
            proxy.malformed(params["kind"])
        elif kind in CLIENT_FAULTS:
            await self._client_fault(kind, params)

    async def _replay_faults(self) -> None:
        for event in self.replay_faults:
            await trio.sleep_until(self.start + event["t"])
            await self._inject(event["fault"], event["params"])

    async def _chaos_task(self) -> None:
        # "cancel" last: this order is part of the seed -> schedule mapping.
        kinds = [k for k in ("drain", "graph", "cancel-in-flight", "cancel")
                 if k in self.config.faults]
        if not kinds:
            return
        while True:
            await trio.sleep(self.rng.expovariate(2 / self.config.fault_interval))
            kind = self.rng.choice(kinds)
            params: dict[str, Any] = {}
            if kind == "drain":
                params = {"hold": round(self.rng.uniform(0, 0.05), 4)}
            elif kind == "graph":
                params = {"choice": self.rng.random()}
            elif kind == "cancel" and self.cancel_scopes:
                params = {"op": self.rng.choice(sorted(self.cancel_scopes))}
            await self._inject(kind, params)

    async def _client_fault(self, kind: str, params: dict[str, Any]) -> None:
        device = self.device
        if device is None or device.state is State.QUIT:
            return
        if kind == "drain":
            async with device.drained():
                self.result.drains += 1
                await trio.sleep(params["hold"])
        elif kind == "graph":
            await self._graph_change(device, params["choice"])
        elif kind == "cancel":
            scope = self.cancel_scopes.get(params.get("op", -1))
            if scope is not None:
                scope.cancel()
        elif kind == "cancel-in-flight":
            self.cancels_in_flight += 1
            device.cancel_in_flight()
            self.result.faults_by_kind["cancel-in-flight"] += 1

    async def _graph_change(self, device: Device, choice: float) -> None:
        if self.filters and choice < 0.5:
            victim = self.filters.pop(int(choice * 2 * len(self.filters)) % len(self.filters))
            await remove_filter(victim)
        else:
            new = self._new_filter(choice)
            await insert_filter(device, new)
            self.filters.append(new)
        self.result.graph_changes += 1

    def _new_filter(self, choice: float) -> FilterNode:
        pick = int(choice * 1000) % 3
        if pick == 0:
            return TraceFilter(capacity=256)
        if pick == 1:
            return ThrottleFilter(bytes_per_second=512 * MiB, ops_per_second=50000)
        fault = FaultFilter(seed=int(choice * 1e6))
        fault.add_rule(["read", "write"], errno=None, delay=0.001, rate=0.2)
        if "error" in self.config.faults:
            fault.add_rule(["read", "write", "zero"], errno=_errno.EIO, rate=0.01)
        return fault

    # --- the end ------------------------------------------------------------------------

    async def _heal(self) -> None:
        """Stop every fault and bring the server back, for the final check."""
        assert self.server is not None and self.proxy is not None
        self.proxy.clear()
        if not self.server.running:
            await self._restart_server()
        device = self.device
        if device is not None and device.state is not State.QUIT:
            for f in self.filters:
                await remove_filter(f)
            self.filters = []

    async def _final_check(self) -> None:
        """Read the whole disk back: every acknowledged write must still be there."""
        step = 4 * MiB
        for offset in range(0, self.config.size, step):
            n = min(step, self.config.size - offset)
            for _attempt in range(3):
                device = await self._current_device()
                try:
                    with trio.fail_after(self.config.bound):
                        await device.wait_connected()
                        data = await device.pread(n, offset)
                except (ProtocolError, ConnectionLostError, RequestError):
                    continue  # a reply broken by a fault still in the pipe: try again
                except trio.TooSlowError:
                    data = None
                if data is None:
                    self._violation(f"final read {offset}+{n}",
                                    f"done within {self.config.bound:g}s", "a hang")
                    break
                self.watchdog.progress()
                mismatch = self.model.check_read(offset, data)
                if mismatch is not None:
                    self._violation(f"final read {offset}+{n}",
                                    f"block {mismatch.offset}: "
                                    f"{mismatch.expected[:16].hex()}...",
                                    f"{mismatch.found[:16].hex()}...")
                break
            else:
                self._violation(f"final read {offset}+{n}", "a successful read",
                                "failed three times")


async def _process_exit(process: Any) -> None:
    """Until ``process`` (a subprocess.Popen) has exited (Linux pidfd; no polling)."""
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return  # gone (and reaped) already
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
