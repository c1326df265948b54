"""ThrottleFilter: bytes/s and ops/s limits with a burst (token buckets).

Theory of operation
-------------------
Two token buckets, one for bytes (READ and WRITE payloads) and one for operations (every
request), refill at their rate up to their burst.  Requests queue in FIFO order (a
``trio.Lock`` is fair) and the one at the head waits until both buckets hold what it
needs, then takes it and goes on.  A request larger than the byte burst waits for a full
bucket and leaves it in debt, so big requests cannot starve.  Throttled requests wait;
they never fail.  ``set_limits()`` takes effect at once, also for the request waiting at
the head (it re-computes its wait).  Time is ``trio.current_time()``, so tests run it on
the autojump clock.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio
from trio_util import RepeatedEvent

from ..protocol.constants import Command
from .filter import FilterNode
from .node import BlockNode

_PAYLOAD = (Command.READ, Command.WRITE)
_UNCHANGED: Any = object()
_EPSILON = 1e-9  # seconds


class _Bucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float | None, burst: float | None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (rate or 0.0)
        self.tokens = self.burst
        self.stamp: float | None = None  # set at first use (needs a running trio)

    def refill(self, now: float) -> None:
        if self.rate and self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` (capped at the burst) is available; 0 if now."""
        if not self.rate or amount <= 0:
            return 0.0
        need = min(amount, self.burst)
        return max(0.0, (need - self.tokens) / self.rate)

    def take(self, amount: float) -> None:
        if self.rate:
            self.tokens -= amount


class ThrottleFilter(FilterNode):
    """Limit throughput: ``bytes_per_second``, ``ops_per_second`` (None: unlimited),
    with bursts of ``burst_bytes``/``burst_ops`` (default: one second's worth)."""

    def __init__(self, child: BlockNode | None = None, *,
                 bytes_per_second: float | None = None, ops_per_second: float | None = None,
                 burst_bytes: float | None = None, burst_ops: float | None = None) -> None:
        super().__init__(child)
        self._queue = trio.Lock()
        self._changed = RepeatedEvent()  # set_limits() was called
        self._bytes = _Bucket(bytes_per_second, burst_bytes)
        self._ops = _Bucket(ops_per_second, burst_ops)

    @property
    def limits(self) -> dict[str, float | None]:
        """The current limits."""
        return {"bytes_per_second": self._bytes.rate, "ops_per_second": self._ops.rate,
                "burst_bytes": self._bytes.burst, "burst_ops": self._ops.burst}

    def set_limits(self, *, bytes_per_second: float | None = _UNCHANGED,
                   ops_per_second: float | None = _UNCHANGED,
                   burst_bytes: float | None = _UNCHANGED,
                   burst_ops: float | None = _UNCHANGED) -> None:
        """Change limits while running (arguments left out stay as they are)."""
        now = trio.current_time()
        for bucket, rate, burst in ((self._bytes, bytes_per_second, burst_bytes),
                                    (self._ops, ops_per_second, burst_ops)):
            bucket.refill(now)
            if rate is not _UNCHANGED:
                bucket.rate = rate
                if burst is _UNCHANGED:
                    bucket.burst = rate or 0.0
            if burst is not _UNCHANGED:
                bucket.burst = burst if burst is not None else (bucket.rate or 0.0)
            bucket.tokens = min(bucket.tokens, bucket.burst)
        self._changed.set()

    async def _forward(self, command: Command, offset: int, length: int,
                       call: Callable[[], Awaitable[Any]]) -> Any:
        nbytes = length if command in _PAYLOAD else 0
        async with self._queue:
            while True:
                now = trio.current_time()
                self._bytes.refill(now)
                self._ops.refill(now)
                wait = max(self._bytes.wait_for(nbytes), self._ops.wait_for(1))
                if wait <= _EPSILON:  # a rounding error's worth of tokens is no reason
                    break
                with trio.move_on_after(wait):
                    await self._changed.wait()  # limits changed: compute again
            self._bytes.take(nbytes)
            self._ops.take(1)
        return await call()
