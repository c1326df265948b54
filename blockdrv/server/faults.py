"""Fault hooks of the embedded server: the programmatic API of fault injection.

A :class:`Faults` object hangs off every export and every connection; the server
consults both for each request.  Every hook is off by default and :attr:`Faults.active`
stays False until one is set, so the server's fast path costs one attribute test.
Hooks can be set and cleared while the server runs (trio is single-threaded, so a change
takes effect for the next request or reply).

=====================  ================================================================
hook                   effect
=====================  ================================================================
``delay``              a command kind waits ``seconds`` before it is executed
``fail``               matching requests fail with an errno, on a
                       :class:`~blockdrv.triggers.Trigger` schedule: every Nth, after N,
                       at a rate (seeded RNG), in a byte range, at most ``times`` times
``drop_after``         the connection is cut right after the Nth next request arrives
                       (its payload included), before it is answered
``drop_in_reply``      the Nth next reply is cut after ``byte_offset`` bytes
``stall``              stop reading and writing for ``seconds`` from now
``malformed_reply``    the next (or every Nth) reply has a bad magic, an unknown cookie
                       or an oversized length
``lose_writes``        writes are acknowledged but not stored (at a rate)
``stale_reads``        reads return what a range held before its latest writes (at a
                       rate): the server serves stale data
=====================  ================================================================

Hostile modes (for fuzzing clients; each is a :class:`ModeRule`, a
:class:`~blockdrv.triggers.Trigger` that also matches handshake options, so it fires on
the same every/after/rate/times schedule; :meth:`Faults.remove` takes it off again):

=========================  ============================================================
mode (``injected`` key)    effect
=========================  ============================================================
``flood`` ("flood")        an option or request is answered with an endless stream,
                           made on the fly (never held), until the client goes away:
                           GO/INFO endless NBD_REP_INFO (NBD_INFO_NAME and unknown info
                           types, in turn), LIST endless NBD_REP_SERVER, SET/LIST_META_
                           CONTEXT endless NBD_REP_META_CONTEXT (distinct names and
                           ids), READ endless ERROR chunks without DONE, BLOCK_STATUS
                           endless block status chunks; the server's real answer comes
                           first, without its final ACK or DONE
``tiny_chunks``            a structured READ reply is cut into chunks of ``min_size`` to
("tiny-chunks")            ``max_size`` bytes sent in a random (seeded) order
``unrequested_context``    SET_META_CONTEXT is also answered with a context the client
("unrequested-context")    did not ask for (``qemu:evil`` by default) under a fresh id
``slowloris``              a reply (option replies and/or transmission replies) is sent
("slowloris")              a few bytes at a time (1 to ``max_piece``), ``delay`` seconds
                           apart, correct otherwise
=========================  ============================================================

During the handshake the connection's hooks apply, and those of the export an option
names (the default export's for LIST); in transmission, the connection's and its
export's.  Counters in :attr:`Faults.injected` say how many faults of each kind were
injected (a hostile mode counts each option or reply it changed).
"""

from __future__ import annotations

import collections
import errno as _errno
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import trio

from ..block.triggers import Trigger, command_of, commands_of, first_firing
from ..protocol.constants import (
    Command,
    Option,
)

MALFORMED_KINDS = ("bad-magic", "unknown-cookie", "oversized-length")

FLOOD_OPTIONS = frozenset({Option.GO, Option.INFO, Option.LIST, Option.SET_META_CONTEXT,
                           Option.LIST_META_CONTEXT})
FLOOD_COMMANDS = frozenset({Command.READ, Command.BLOCK_STATUS})
EVIL_CONTEXT = "qemu:evil"


@dataclass(eq=False)
class FailRule(Trigger):
    """Fail requests the trigger fires for with ``errno``."""

    errno: int = _errno.EIO


def option_of(value: Option | int | str) -> Option | int:
    """An option from an enum, a number, or a name like "go" or "set-meta-context"."""
    if isinstance(value, str):
        try:
            return Option[value.upper().replace("-", "_")]
        except KeyError:
            raise ValueError(f"unknown option {value!r}") from None
    return value


@dataclass(eq=False)
class ModeRule(Trigger):
    """When a hostile mode applies: the requests a :class:`Trigger` matches (``commands``
    None: all) and the handshake ``options`` (None: all; empty: none)."""

    options: frozenset[int] | None = frozenset()

    def fire_option(self, option: int, rng: random.Random) -> bool:
        """Count an option; True when the rule fires for it."""
        if self.options is not None and option not in self.options:
            return False
        return self.count(rng)


@dataclass(eq=False)
class FloodRule(ModeRule):
    """Answer with an endless stream (see the module docstring)."""


@dataclass(eq=False)
class TinyChunksRule(ModeRule):
    """Cut READ replies into chunks of ``min_size`` to ``max_size`` bytes, shuffled."""

    min_size: int = 1
    max_size: int = 512

    def piece_size(self, rng: random.Random) -> int:
        """The size of the next chunk."""
        return rng.randint(self.min_size, self.max_size)


@dataclass(eq=False)
class UnrequestedContextRule(ModeRule):
    """Offer the context ``name`` in answer to SET_META_CONTEXT as well."""

    name: str = EVIL_CONTEXT


@dataclass(eq=False)
class SlowlorisRule(ModeRule):
    """Send replies 1 to ``max_piece`` bytes at a time, ``delay`` seconds apart."""

    max_piece: int = 8
    delay: float = 0.01


R = TypeVar("R", bound=ModeRule)


@dataclass(eq=False)
class Faults:
    """The fault hooks of one export or connection (see the module docstring)."""

    seed: int | None = None
    active: bool = False
    delays: dict[Command, float] = field(default_factory=dict)
    rules: list[FailRule] = field(default_factory=list)
    drop_countdown: int | None = None
    cut_countdown: int | None = None
    cut_at: int = 0
    stall_until: float | None = None
    malformed_kind: str | None = None
    malformed_every: int = 0
    malformed_countdown: int = 0
    lose_rate: float = 0.0
    stale_rate: float = 0.0
    history: collections.deque[tuple[int, bytes]] = field(
        default_factory=lambda: collections.deque(maxlen=4096))
    modes: list[ModeRule] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    crash_countdown: int | None = None
    crash: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _update(self) -> None:
        self.active = bool(self.delays or self.rules or self.drop_countdown is not None
                           or self.crash_countdown is not None
                           or self.cut_countdown is not None or self.stall_until is not None
                           or self.malformed_kind or self.lose_rate or self.stale_rate
                           or self.modes)

    # --- configuration -----------------------------------------------------------------

    def delay(self, command: Command | int | str, seconds: float) -> None:
        """Delay every request of ``command`` by ``seconds`` (0 removes the delay)."""
        cmd = command_of(command)
        if seconds > 0:
            self.delays[cmd] = seconds
        else:
            self.delays.pop(cmd, None)
        self._update()

    def fail(self, commands: object = None, *, errno: int = _errno.EIO, every: int = 1,
             after: int = 0, rate: float = 1.0, byte_range: tuple[int, int] | None = None,
             times: int | None = None) -> FailRule:
        """Add a failure rule; returns it so it can be removed with :meth:`remove`."""
        rule = FailRule(commands=commands_of(commands), byte_range=byte_range, every=every,
                        after=after, times=times, rate=rate, errno=errno)
        self.rules.append(rule)
        self._update()
        return rule

    def remove(self, rule: FailRule | ModeRule) -> None:
        """Remove a failure rule or a hostile mode."""
        if isinstance(rule, ModeRule):
            self.modes.remove(rule)
        else:
            self.rules.remove(rule)
        self._update()

    def _add_mode(self, rule: R, options: object, commands: object) -> R:
        rule.options = None if options is None else frozenset(
            option_of(o) for o in ([options] if isinstance(options, (str, int))
                                   else options))  # type: ignore[attr-defined]
        rule.commands = commands_of(commands)
        self.modes.append(rule)
        self._update()
        return rule

    def flood(self, options: object = FLOOD_OPTIONS, commands: object = FLOOD_COMMANDS, *,
              every: int = 1, after: int = 0, rate: float = 1.0,
              times: int | None = None) -> FloodRule:
        """Answer matching options (of GO, INFO, LIST, SET/LIST_META_CONTEXT) and
        requests (READ, BLOCK_STATUS) with an endless stream; ``options=()`` or
        ``commands=()`` leaves that phase alone."""
        return self._add_mode(FloodRule(every=every, after=after, rate=rate, times=times),
                              options, commands)

    def tiny_chunks(self, max_size: int = 512, *, min_size: int = 1, every: int = 1,
                    after: int = 0, rate: float = 1.0,
                    times: int | None = None) -> TinyChunksRule:
        """Cut structured READ replies into ``min_size``..``max_size`` byte chunks sent
        in a random order."""
        if not 1 <= min_size <= max_size:
            raise ValueError("need 1 <= min_size <= max_size")
        rule = TinyChunksRule(every=every, after=after, rate=rate, times=times,
                              min_size=min_size, max_size=max_size)
        return self._add_mode(rule, (), Command.READ)

    def unrequested_context(self, name: str = EVIL_CONTEXT, *, every: int = 1,
                            after: int = 0, rate: float = 1.0,
                            times: int | None = None) -> UnrequestedContextRule:
        """Answer SET_META_CONTEXT with the context ``name`` too, which was not asked for."""
        rule = UnrequestedContextRule(every=every, after=after, rate=rate, times=times,
                                      name=name)
        return self._add_mode(rule, Option.SET_META_CONTEXT, ())

    def slowloris(self, max_piece: int = 8, delay: float = 0.01, *,
                  options: object = None, commands: object = None, every: int = 1,
                  after: int = 0, rate: float = 1.0,
                  times: int | None = None) -> SlowlorisRule:
        """Trickle matching option replies and transmission replies (default: all)
        1 to ``max_piece`` bytes at a time, ``delay`` seconds apart."""
        if max_piece < 1 or delay < 0:
            raise ValueError("need max_piece >= 1 and delay >= 0")
        rule = SlowlorisRule(every=every, after=after, rate=rate, times=times,
                             max_piece=max_piece, delay=delay)
        return self._add_mode(rule, options, commands)

    def drop_after(self, requests: int) -> None:
        """Cut the connection right after the ``requests``-th next request arrives."""
        self.drop_countdown = requests
        self._update()

    def drop_in_reply(self, byte_offset: int, *, reply: int = 1) -> None:
        """Cut the connection ``byte_offset`` bytes into the ``reply``-th next reply."""
        self.cut_countdown, self.cut_at = reply, byte_offset
        self._update()

    def stall(self, seconds: float) -> None:
        """Stop reading and writing for ``seconds``, starting now."""
        self.stall_until = trio.current_time() + seconds
        self.injected["stall"] += 1
        self._update()

    def malformed_reply(self, kind: str, *, every: int = 0) -> None:
        """Corrupt the next reply (``every=0``) or every Nth reply."""
        if kind not in MALFORMED_KINDS:
            raise ValueError(f"malformed reply kind must be one of {MALFORMED_KINDS}")
        self.malformed_kind, self.malformed_every = kind, every
        self.malformed_countdown = max(every, 1)
        self._update()

    def crash_after(self, requests: int, crash: Callable[[], None]) -> None:
        """Call ``crash`` when the ``requests``-th next request arrives (``blockdrv serve
        --crash-after N`` makes it kill its own process: a server crash on cue)."""
        self.crash_countdown, self.crash = requests, crash
        self._update()

    def lose_writes(self, rate: float = 1.0) -> None:
        """Acknowledge writes without storing them, with probability ``rate``."""
        self.lose_rate = rate
        self._update()

    def stale_reads(self, rate: float = 1.0) -> None:
        """Serve reads from what ranges held before their latest writes, at ``rate``."""
        self.stale_rate = rate
        self._update()

    def clear(self) -> None:
        """Turn every hook off (counters are kept)."""
        self.delays.clear()
        self.rules.clear()
        self.drop_countdown = self.cut_countdown = self.stall_until = None
        self.malformed_kind = None
        self.lose_rate = self.stale_rate = 0.0
        self.history.clear()
        self.modes.clear()
        self._update()

    # --- decisions (called by the server for each request or reply) -------------------

    def delay_for(self, command: Command) -> float:
        """Seconds to delay a request of ``command`` (0: none), counted when used."""
        seconds = self.delays.get(command, 0.0)
        if seconds:
            self.injected["delay"] += 1
        return seconds

    def failure_for(self, command: Command, offset: int, length: int) -> int | None:
        """The errno a request must fail with, or None; counted when it fires."""
        rule = first_firing(self.rules, command, offset, length, self.rng)
        if rule is None:
            return None
        self.injected["error"] += 1
        return rule.errno  # type: ignore[attr-defined,no-any-return]

    def request_arrived(self) -> bool:
        """Count a request; True when the connection must be cut now."""
        if self.crash_countdown is not None:
            self.crash_countdown -= 1
            if self.crash_countdown <= 0 and self.crash is not None:
                self.injected["crash"] += 1
                self.crash()
        if self.drop_countdown is None:
            return False
        self.drop_countdown -= 1
        if self.drop_countdown > 0:
            return False
        self.drop_countdown = None
        self.injected["drop"] += 1
        self._update()
        return True

    def reply_cut(self) -> int | None:
        """Byte offset at which to cut this reply, or None."""
        if self.cut_countdown is None:
            return None
        self.cut_countdown -= 1
        if self.cut_countdown > 0:
            return None
        self.cut_countdown = None
        self.injected["drop-in-reply"] += 1
        self._update()
        return self.cut_at

    async def wait_stall(self) -> None:
        """Sleep while a stall is in force."""
        until = self.stall_until
        if until is None:
            return
        if trio.current_time() < until:
            await trio.sleep_until(until)
        if self.stall_until == until:
            self.stall_until = None
            self._update()

    def malform(self) -> str | None:
        """The corruption to apply to this reply, or None."""
        if not self.malformed_kind:
            return None
        self.malformed_countdown -= 1
        if self.malformed_countdown > 0:
            return None
        kind = self.malformed_kind
        if self.malformed_every:
            self.malformed_countdown = self.malformed_every
        else:
            self.malformed_kind = None
            self._update()
        self.injected["malformed"] += 1
        return kind

    def remember(self, offset: int, old: bytes) -> None:
        """Keep what a range held before a write (for stale reads)."""
        self.history.append((offset, old))

    def serve_stale(self) -> bool:
        """Whether this read is to be served stale (the rate's draw; no data needed)."""
        return bool(self.stale_rate) and (self.stale_rate >= 1
                                          or self.rng.random() < self.stale_rate)

    def overlay_stale(self, offset: int, data: bytearray) -> bool:
        """Overlay remembered old contents on ``data``, read at ``offset``; True if any
        were (counted as a stale read).  :meth:`serve_stale` decides whether to."""
        end, changed = offset + len(data), False
        for at, old in self.history:
            lo, hi = max(at, offset), min(at + len(old), end)
            if lo < hi:
                data[lo - offset:hi - offset] = old[lo - at:hi - at]
                changed = True
        if changed:
            self.injected["stale-read"] += 1
        return changed

    def lose_write(self) -> bool:
        """Whether to drop this write silently (the lose-writes hook)."""
        if self.lose_rate and (self.lose_rate >= 1 or self.rng.random() < self.lose_rate):
            self.injected["lost-write"] += 1
            return True
        return False

    # --- hostile modes -----------------------------------------------------------------

    def mode_for_option(self, kind: type[R], option: int) -> R | None:
        """The first rule of a hostile mode that fires for this option (counted)."""
        for rule in self.modes:
            if isinstance(rule, kind) and rule.fire_option(option, self.rng):
                self.injected[MODE_NAMES[kind]] += 1
                return rule
        return None

    def mode_for_request(self, kind: type[R], command: Command, offset: int,
                         length: int) -> R | None:
        """The first rule of a hostile mode that fires for this request (counted)."""
        for rule in self.modes:
            if isinstance(rule, kind) and rule.fire(command, offset, length, self.rng):
                self.injected[MODE_NAMES[kind]] += 1
                return rule
        return None


MODE_NAMES: dict[type[ModeRule], str] = {
    FloodRule: "flood", TinyChunksRule: "tiny-chunks",
    UnrequestedContextRule: "unrequested-context", SlowlorisRule: "slowloris"}


# --- what the hostile modes send ----------------------------------------------------------
