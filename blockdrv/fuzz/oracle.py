"""The fuzz run's judge: what each operation's outcome must be, with no I/O.

Theory of operation
-------------------
The :class:`Oracle` is told what happened (an operation's result or exception, how long
it took, what was going on around it) and decides against the
:class:`~blockdrv.fuzz.model.Model` whether that breaks an invariant.  It never talks to
the device or the server, so every rule can be unit-tested with made-up outcomes:

1. a successful read returns what the model holds (known blocks); block status tiles
   the range and never claims zeroes over known data;
2. acknowledged writes survive (the model is never reset; the final read-back uses 1);
3. a failure needs an explanation (:class:`Circumstances`): an injected error, a
   protocol-breaking fault since the device was opened (a ProtocolError), a
   ``cancel_in_flight()``; an expired reconnect delay only when faults kept the server
   unreachable for all of it (:mod:`~blockdrv.fuzz.availability`); drains and graph
   changes never;
4. every operation ends within its bound (``reconnect_delay`` + the longest stall + a
   margin), unless a storm of faults left the server reachable for less than
   ``HANG_REACHABLE`` seconds of its life, and a cancelled one within its deadline +
   ``cancel_timeout`` + a margin;
5. identity: a late or repeated reply never shows up as data (1 catches it), only as a
   ProtocolError.

A failed or cancelled write makes its range unknown; that is not a violation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..block.node import Extent
from ..nbd import State
from ..protocol.errors import ConnectionLostError, ProtocolError, RequestError
from .availability import HANG_REACHABLE
from .config import FuzzConfig
from .model import Model
from .monitors import Report
from .records import Op

_WRITING = ("write", "zero", "trim")


@dataclass(frozen=True)
class Circumstances:
    """What was going on around a failed operation."""

    protocol_faults: int = 0  # protocol-breaking faults injected since the device opened
    errors_injected: bool = False  # the run injects error replies
    cancel_in_flight: bool = False  # cancel_in_flight() was called while it ran
    state: State = State.CONNECTED  # the device's state when it failed
    delay_expired: bool = False  # the device's reconnect delay ever expired
    unreachable_throughout: bool = False  # faults kept the server away for the last delay


class Oracle:
    """See the module docstring."""

    def __init__(self, config: FuzzConfig, model: Model, report: Report) -> None:
        self.config = config
        self.model = model
        self.report = report

    def succeeded(self, op: Op, result: Any, data: bytes | None) -> None:
        """Rule 1 for a successful operation, and the model follows it."""
        model = self.model
        if op.kind == "read":
            mismatch = model.check_read(op.offset, result)
            if mismatch is not None:
                self.report(op.describe(),
                            f"block {mismatch.offset}: {mismatch.expected[:16].hex()}...",
                            f"{mismatch.found[:16].hex()}...", "data")
        elif op.kind == "write":
            assert data is not None
            model.written(op.offset, data)
        elif op.kind == "zero":
            model.zeroed(op.offset, op.length)
        elif op.kind == "trim":
            model.unknown(op.offset, op.length)
        elif op.kind == "block_status":
            extents: list[Extent] = result
            problem = model.check_extents(op.offset, op.length, extents)
            if problem is not None:
                self.report(op.describe(), "extents consistent with the data", problem,
                            "data")

    def unknown(self, op: Op) -> None:
        """The operation's effect cannot be known: its range may hold anything."""
        if op.kind in _WRITING:
            self.model.unknown(op.offset, op.length)

    def failed(self, op: Op, exc: BaseException, around: Circumstances) -> str | None:
        """Rule 3: why the failure is acceptable, or None after reporting it."""
        self.unknown(op)
        reason = self.explain(exc, around)
        if reason is None:
            self.report(op.describe(), "success (nothing explains a failure)",
                        f"{type(exc).__name__}: {exc}", "no unexplained failure")
        return reason

    @staticmethod
    def explain(exc: BaseException, around: Circumstances) -> str | None:
        if isinstance(exc, ProtocolError):
            return "a protocol-breaking fault" if around.protocol_faults else None
        if isinstance(exc, RequestError):
            return "injected error" if around.errors_injected else None
        if isinstance(exc, ConnectionLostError):
            if around.delay_expired:
                return ("the reconnect delay expired: faults kept the server unreachable "
                        "throughout" if around.unreachable_throughout else None)
            if around.cancel_in_flight:
                return "cancel_in_flight() while reconnecting"
            if around.state is State.QUIT and around.protocol_faults:
                return "the device died of a protocol-breaking fault"
            return None
        return None

    def duration(self, op: Op, took: float, *, hung: bool, cancelled: bool,
                 reachable: float = math.inf) -> None:
        """Rule 4 (``reachable``: for how long, in all, faults left the server reachable
        during the operation)."""
        config = self.config
        if hung and reachable >= HANG_REACHABLE:
            self.report(op.describe(), f"completion within {config.bound:g}s",
                        f"still running: a hang (the server was reachable for "
                        f"{min(reachable, took):.1f}s of it)", "deadline")
        elif cancelled and op.cancel_after is not None \
                and took > op.cancel_after + config.cancel_bound:
            self.report(op.describe(), f"cancelled at {op.cancel_after:g}s, so done "
                        f"within {op.cancel_after + config.cancel_bound:g}s "
                        "(its deadline + cancel_timeout + 1s)",
                        f"took {took:.2f}s", "deadline")
