"""The faults of a fuzz run: when they come and what they do.

Two tasks inject at seeded random moments (exponential gaps): the *fault task* for the
proxy's network and hostile-peer faults and server kills, the *chaos task* for what the
client itself does (drained sections, filter insertion and removal, cancellations,
``cancel_in_flight()``).  Every injection is recorded in the trace with its parameters
before it happens, so ``--replay`` can do the same at the same moments.  Which kind
applies where is in :mod:`blockdrv.fuzz.config`.
"""

from __future__ import annotations

import errno as _errno
import random
from typing import TYPE_CHECKING, Any, Callable, Protocol

import trio

from ..block import (
    FaultFilter,
    FilterNode,
    ThrottleFilter,
    TraceFilter,
    insert_filter,
    remove_filter,
)
from ..nbd import Device, State
from ..nbd.query import list_exports, list_meta_contexts
from ..protocol.errors import NBDError
from ..server.faults import MALFORMED_KINDS
from .config import CLIENT_FAULTS, PROXY_FAULTS, FuzzConfig, MiB
from .proxy import TO_CLIENT, TO_SERVER

if TYPE_CHECKING:
    from .availability import Availability
    from .harness import ServerHarness
    from .proxy import FaultProxy
    from .records import FuzzResult
    from .watchdog import Watchdog


class FaultTarget(Protocol):
    """What an :class:`Injector` needs of its run (:class:`~blockdrv.fuzz.runner.FuzzRun`
    is one), so the injector does not depend on the runner that owns it."""

    config: FuzzConfig
    result: FuzzResult
    availability: Availability
    cancel_scopes: dict[int, trio.CancelScope]
    start: float
    watchdog: Watchdog

    @property
    def proxy(self) -> FaultProxy: ...
    @property
    def harness(self) -> ServerHarness: ...
    @property
    def device(self) -> Device | None: ...
    def record(self, entry: dict[str, Any]) -> None: ...
    def report(self, operation: str, expected: str, found: str,
               invariant: str = "") -> None: ...

_FLOOD_WHERE = ("reply", "handshake", "list", "contexts")
_BREAKS_A_CONNECTION = ("cut", "reset", "malformed", "duplicate", "flood",
                        "unrequested-context")


def keeps_the_server_away(kind: str, params: dict[str, Any]) -> float | None:
    """For how long a fault keeps the device from (re)connecting; None if it does not.
    (A kill is the harness's to tell: from the kill until the server is back.)"""
    if kind in _BREAKS_A_CONNECTION:
        return 0.0
    if kind == "stall":
        return float(params["seconds"])
    if kind == "slowloris":
        return float(params["bytes"] / params["piece"] * params["delay"])
    return None


class Injector:
    """Faults for one run (see the module docstring)."""

    def __init__(self, run: FaultTarget) -> None:
        self.run = run
        self.config: FuzzConfig = run.config
        self.rng = random.Random(run.config.seed + 1)
        self.cancels_in_flight = 0  # cancel_in_flight() calls so far
        self.filters: list[FilterNode] = []

    # --- when -------------------------------------------------------------------------

    async def fault_task(self) -> None:
        kinds = [k for k in PROXY_FAULTS if k in self.config.faults]
        if not kinds:
            return
        while True:
            await trio.sleep(self.rng.expovariate(1 / self.config.fault_interval))
            kind = self.rng.choice(kinds)
            await self.inject(kind, self._params(kind))

    async def chaos_task(self) -> None:
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
            elif kind == "cancel" and self.run.cancel_scopes:
                params = {"op": self.rng.choice(sorted(self.run.cancel_scopes))}
            await self.inject(kind, params)

    async def replay(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            await trio.sleep_until(self.run.start + event["t"])
            await self.inject(event["fault"], event["params"])
            self.run.watchdog.progress()  # waiting for the trace's next fault is no hang

    def _params(self, kind: str) -> dict[str, Any]:
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
        if kind == "flood":
            return {"where": rng.choice(_FLOOD_WHERE)}
        if kind == "slowloris":
            return {"bytes": rng.randint(64, 4096), "piece": rng.randint(1, 16),
                    "delay": round(rng.uniform(0.0005, 0.004), 4)}
        return {}

    # --- what -------------------------------------------------------------------------

    async def inject(self, kind: str, params: dict[str, Any]) -> None:
        run = self.run
        proxy, harness = run.proxy, run.harness
        run.record({"fault": kind, "params": params})
        if kind == "kill":
            harness.kill()
            run.result.faults_by_kind["kill"] += 1
            await trio.sleep(params["outage"])
            await harness.restart()
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
        elif kind == "duplicate":
            proxy.duplicate()
        elif kind == "tiny-chunks":
            proxy.tiny_chunks()
        elif kind == "slowloris":
            proxy.slowloris(params["bytes"], params["piece"], params["delay"])
        elif kind == "unrequested-context":
            proxy.unrequested_context()
            proxy.reset()  # the reconnect's handshake meets it
        elif kind == "flood":
            await self._flood(params["where"])
        elif kind in CLIENT_FAULTS:
            await self._client_fault(kind, params)
        away = keeps_the_server_away(kind, params)
        if away is not None:  # from when the fault is done (a flooded query took time)
            run.availability.broken(away)

    async def _flood(self, where: str) -> None:
        """A flood of the next reply, of a reconnect's handshake, or of a list query
        made here, which must end in a ProtocolError (a cap), in time."""
        proxy = self.run.proxy
        if where == "reply":
            proxy.flood("reply")
            return
        proxy.flood("handshake")
        if where == "handshake":
            proxy.reset()  # the reconnect's handshake meets it
            return
        ask: Callable[[], Any] = (
            (lambda: list_exports(proxy.address)) if where == "list"
            else (lambda: list_meta_contexts(proxy.address, queries=["base:"])))
        started = trio.current_time()
        with trio.move_on_after(self.config.bound) as scope:
            try:
                await ask()
            except NBDError:
                pass  # a cap ended it (ProtocolError), or the server was away: both right
        if scope.cancelled_caught:
            self.run.report(f"flooded {where} query", f"an answer or an error within "
                            f"{self.config.bound:g}s",
                            f"still running after {trio.current_time() - started:.1f}s",
                            "deadline")

    async def _client_fault(self, kind: str, params: dict[str, Any]) -> None:
        run = self.run
        device = run.device
        if device is None or device.state is State.QUIT:
            return
        if kind == "drain":
            async with device.drained():
                run.result.drains += 1
                await trio.sleep(params["hold"])
        elif kind == "graph":
            await self._graph_change(device, params["choice"])
        elif kind == "cancel":
            scope = run.cancel_scopes.get(params.get("op", -1))
            if scope is not None:
                scope.cancel()
        elif kind == "cancel-in-flight":
            self.cancels_in_flight += 1
            device.cancel_in_flight()
            run.result.faults_by_kind["cancel-in-flight"] += 1

    async def _graph_change(self, device: Device, choice: float) -> None:
        if self.filters and choice < 0.5:
            victim = self.filters.pop(int(choice * 2 * len(self.filters)) % len(self.filters))
            await remove_filter(victim)
        else:
            new = self._new_filter(choice)
            await insert_filter(device, new)
            self.filters.append(new)
        self.run.result.graph_changes += 1

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

    async def remove_filters(self) -> None:
        for f in self.filters:
            await remove_filter(f)
        self.filters = []
