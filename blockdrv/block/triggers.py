"""When a fault fires: the matching rule shared by every fault injector.

A :class:`Trigger` matches requests by command kind and byte range, counts the matches,
and fires on a schedule: after the first ``after`` matches, on every ``every``-th one,
with probability ``rate`` (from the injector's seeded RNG), at most ``times`` times
(``times=1`` is "once").  The embedded server's fault hooks and the block graph's
FaultFilter both build on it, so a rule means the same in both places.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from ..protocol.constants import Command
from ..protocol.errors import InvalidArgumentError


def command_of(value: Command | int | str) -> Command:
    """A Command from an enum, a number, or a name like "read" or "write-zeroes"
    ("zero" and "block-status" work too)."""
    if isinstance(value, str):
        name = value.upper().replace("-", "_")
        name = {"ZERO": "WRITE_ZEROES", "WRITE_ZERO": "WRITE_ZEROES"}.get(name, name)
        try:
            return Command[name]
        except KeyError:
            raise InvalidArgumentError(f"unknown command {value!r}") from None
    return Command(value)


def commands_of(values: object) -> frozenset[Command] | None:
    """None (every command) or a set of commands from one value or an iterable."""
    if values is None:
        return None
    if isinstance(values, (str, int, Command)):
        values = [values]
    return frozenset(command_of(v) for v in values)  # type: ignore[attr-defined]


@dataclass(eq=False)
class Trigger:
    """Which requests a rule applies to, and when it fires (see the module docstring)."""

    commands: frozenset[Command] | None = None
    byte_range: tuple[int, int] | None = None  # (offset, length) a request must touch
    every: int = 1
    after: int = 0
    times: int | None = None
    rate: float = 1.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.every < 1 or self.after < 0 or not 0 <= self.rate <= 1:
            raise InvalidArgumentError("need every >= 1, after >= 0 and 0 <= rate <= 1")
        if self.times is not None and self.times < 0:
            raise InvalidArgumentError("times must not be negative")

    def matches(self, command: Command, offset: int, length: int) -> bool:
        if self.commands is not None and command not in self.commands:
            return False
        if self.byte_range is not None:
            start, n = self.byte_range
            if offset >= start + n or offset + max(length, 1) <= start:
                return False
        return True

    def fire(self, command: Command, offset: int, length: int, rng: random.Random) -> bool:
        """Count a request; True when the rule fires for it."""
        if not self.matches(command, offset, length):
            return False
        return self.count(rng)

    def count(self, rng: random.Random) -> bool:
        """Count a matching event (a request, or anything a subclass matches itself);
        True when the schedule says the rule fires for it."""
        if self.times is not None and self.fired >= self.times:
            return False
        self.seen += 1
        if self.seen <= self.after or (self.seen - self.after) % self.every:
            return False
        if self.rate < 1 and rng.random() >= self.rate:
            return False
        self.fired += 1
        return True


def first_firing(triggers: Iterable[Trigger], command: Command, offset: int, length: int,
                 rng: random.Random) -> Trigger | None:
    """The first rule that fires for this request, or None."""
    for trigger in triggers:
        if trigger.fire(command, offset, length, rng):
            return trigger
    return None
