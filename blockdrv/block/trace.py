"""TraceFilter: record every request that passes (the "sniff the traffic" proxy).

Each request gives one :class:`TraceRecord` when it completes, whatever the outcome (a
success, the error it raised, or ``cancelled``), kept in a bounded ring (``records``,
oldest first) and/or handed to a callback.
"""

from __future__ import annotations

import collections
import errno as _errno
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from ..protocol.constants import Command
from .filter import FilterNode
from .node import BlockNode

_KIND = {Command.READ: "read", Command.WRITE: "write", Command.WRITE_ZEROES: "zero",
         Command.TRIM: "trim", Command.FLUSH: "flush", Command.CACHE: "cache",
         Command.BLOCK_STATUS: "block_status"}


@dataclass(frozen=True)
class TraceRecord:
    """One request: what it was, when it started, how long it took, how it ended."""

    kind: str  # read, write, zero, trim, flush, cache, block_status
    offset: int
    length: int
    start: float  # trio.current_time() when it entered the filter
    latency: float  # seconds until it completed
    error: BaseException | None = None  # None: success

    @property
    def result(self) -> str:
        """``ok``, ``cancelled``, or the errno name (``EIO``) or exception class."""
        if self.error is None:
            return "ok"
        if isinstance(self.error, trio.Cancelled):
            return "cancelled"
        code = getattr(self.error, "errno", None)
        if isinstance(code, int):
            return _errno.errorcode.get(code, str(code))
        return type(self.error).__name__


class TraceFilter(FilterNode):
    """Records each request into ``records`` (a ring of ``capacity``) and/or ``callback``."""

    def __init__(self, child: BlockNode | None = None, *, capacity: int | None = 10000,
                 callback: Callable[[TraceRecord], None] | None = None) -> None:
        super().__init__(child)
        self.records: collections.deque[TraceRecord] = collections.deque(maxlen=capacity)
        self.callback = callback
        self.count = 0  # every request ever recorded (the ring may have dropped some)

    async def _forward(self, command: Command, offset: int, length: int,
                       call: Callable[[], Awaitable[Any]]) -> Any:
        start = trio.current_time()
        error: BaseException | None = None
        try:
            return await call()
        except BaseException as exc:
            error = exc
            raise
        finally:
            record = TraceRecord(_KIND[command], offset, length, start,
                                 trio.current_time() - start, error)
            self.count += 1
            self.records.append(record)
            if self.callback is not None:
                self.callback(record)
