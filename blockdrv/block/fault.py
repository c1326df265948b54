"""FaultFilter: fail or delay requests by rule, like qemu's blkdebug.

A rule is a :class:`~blockdrv.triggers.Trigger` (command kinds, byte range, once / every
Nth / after N / at most N times, a rate from the filter's seeded RNG) with an action:
fail with an errno (a :class:`~blockdrv.RequestError`, as if the server had said so),
delay, or both (delay, then fail).  Rules are added and removed while I/O flows; the
first rule that fires for a request decides.
"""

from __future__ import annotations

import errno as _errno
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from ..protocol.constants import Command
from ..protocol.errors import InvalidArgumentError, RequestError, describe_errno
from .filter import FilterNode
from .node import BlockNode
from .triggers import Trigger, commands_of, first_firing


@dataclass(eq=False)
class FaultRule(Trigger):
    """A trigger and what to do when it fires: delay, then fail with ``errno`` (if set)."""

    errno: int | None = None
    delay: float = 0.0


class FaultFilter(FilterNode):
    """Inject failures and delays (see the module docstring)."""

    def __init__(self, child: BlockNode | None = None, *, seed: int | None = None) -> None:
        super().__init__(child)
        self.rng = random.Random(seed)
        self.rules: list[FaultRule] = []
        self.injected: Counter[str] = Counter()

    def add_rule(self, commands: object = None, *, errno: int | None = _errno.EIO,
                 delay: float = 0.0, byte_range: tuple[int, int] | None = None,
                 once: bool = False, every: int = 1, after: int = 0,
                 times: int | None = None, rate: float = 1.0) -> FaultRule:
        """Add a rule; ``commands`` is a kind ("read", "write", "zero", ...), a list of
        kinds, or None for all.  Returns the rule, for :meth:`remove_rule`."""
        if errno is None and delay <= 0:
            raise InvalidArgumentError("a rule needs an errno, a delay, or both")
        rule = FaultRule(commands=commands_of(commands), byte_range=byte_range,
                         every=every, after=after, times=1 if once else times, rate=rate,
                         errno=errno, delay=delay)
        self.rules.append(rule)
        return rule

    def remove_rule(self, rule: FaultRule) -> None:
        """Remove one rule (it stops firing at once)."""
        self.rules.remove(rule)

    def clear(self) -> None:
        """Remove every rule."""
        self.rules.clear()

    async def _forward(self, command: Command, offset: int, length: int,
                       call: Callable[[], Awaitable[Any]]) -> Any:
        if self.rules:
            rule = first_firing(self.rules, command, offset, length, self.rng)
            if rule is not None:
                assert isinstance(rule, FaultRule)
                if rule.delay > 0:
                    self.injected["delay"] += 1
                    await trio.sleep(rule.delay)
                if rule.errno is not None:
                    self.injected["error"] += 1
                    raise RequestError(f"{command.name} {offset}+{length} failed: injected "
                                       f"fault {describe_errno(rule.errno)}",
                                       errno=rule.errno)
        return await call()
