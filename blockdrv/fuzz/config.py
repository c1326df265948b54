"""What a fuzz run does: its configuration and the fault kinds it knows.

Fault kinds, by who injects them (``--faults`` takes these names; ``faults_by_kind``
counts them):

=====================  ===============================================================
network (proxy)        ``kill`` (the server, then a restart), ``cut``, ``reset``,
                       ``stall``, ``delay``, ``malformed``
hostile peer (proxy)   ``duplicate`` (an earlier whole reply again, late), ``flood`` (an
                       endless stream of option replies or reply chunks, from another
                       thread), ``tiny-chunks`` (a READ reply cut into many small chunks
                       in random order), ``unrequested-context`` (a meta context nobody
                       asked for), ``slowloris`` (replies trickled a few bytes at a time)
client (the run)       ``drain``, ``graph``, ``cancel``, ``cancel-in-flight``,
                       ``cancel-write`` (large writes cancelled while their payload is
                       being sent)
server (embedded)      ``error``, ``reorder``
checker (must fail)    ``lose-writes``, ``stale-reads``
=====================  ===============================================================

``default`` is every kind the driver must survive: all but the checker kinds, which make
a correct driver fail the run on purpose (``all`` adds them).  The hostile-peer kinds are
in ``default`` because each stands for a class of defects the driver once had that a
fault model without them could not find (freezes, unbounded memory, wrong identity,
starvation); every kind works against every server because the proxy makes it, except
``error`` and ``reorder``, which only the embedded server does (other servers get the
FaultFilter's errors).  A spec is comma-separated words: ``default``, ``all``, ``none``,
kinds, and ``-kind`` to take one out (``default,-kill``).

More workers than ``max_in_flight`` by default (``concurrency`` = 4 x ``max_in_flight``),
so admission always has a queue and fairness is tested.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.errors import InvalidArgumentError
from ..util.units import MiB as MiB

NETWORK_FAULTS = ("kill", "cut", "reset", "stall", "delay", "malformed")
HOSTILE_FAULTS = ("duplicate", "flood", "tiny-chunks", "unrequested-context", "slowloris")
CLIENT_FAULTS = ("drain", "graph", "cancel", "cancel-in-flight", "cancel-write")
SERVER_FAULTS = ("error", "reorder")
CHECKER_FAULTS = ("lose-writes", "stale-reads")  # make a correct checker fail
DEFAULT_FAULTS = NETWORK_FAULTS + HOSTILE_FAULTS + CLIENT_FAULTS + SERVER_FAULTS
ALL_FAULTS = DEFAULT_FAULTS + CHECKER_FAULTS
PROXY_FAULTS = NETWORK_FAULTS + HOSTILE_FAULTS  # injected at random moments by the proxy
PROTOCOL_BREAKING = ("malformed", "duplicate", "flood", "unrequested-context")
"""Faults after which a ProtocolError is the right answer (the connection is dead)."""

SERVER_KINDS = ("embedded", "nbdkit", "qemu-nbd")


def parse_faults(text: str) -> tuple[str, ...]:
    """``default``, ``all``, ``none``, kinds and ``-kind`` exclusions, comma-separated,
    in order (``default,flood,-kill``)."""
    kinds: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        if word == "default":
            kinds += DEFAULT_FAULTS
        elif word == "all":
            kinds += ALL_FAULTS
        elif word in ("none", ""):
            continue
        elif word.startswith("-") and word[1:] in ALL_FAULTS:
            kinds = [k for k in kinds if k != word[1:]]
        elif word in ALL_FAULTS:
            kinds.append(word)
        else:
            raise InvalidArgumentError(f"unknown fault {word!r}; choose from default, all, "
                                       f"none, {', '.join(ALL_FAULTS)} (or -KIND)")
    return tuple(dict.fromkeys(kinds))


@dataclass
class FuzzConfig:
    server: str = "embedded"
    server_cmd: str | None = None
    seed: int = 0
    duration: float | None = None
    ops: int | None = None
    concurrency: int | None = None  # default: 4 x max_in_flight (oversubscribed)
    faults: tuple[str, ...] = DEFAULT_FAULTS
    reconnect_delay: float = 15.0
    size: int = 64 * MiB
    block: int = 4096
    fault_interval: float = 1.0  # mean seconds between network faults
    max_outage: float = 3.0
    max_stall: float = 2.0
    max_in_flight: int = 8
    connections: int = 1  # > 1: a multi-conn device (when the server offers it)
    structured: bool = True  # False: ask for simple replies only
    cancel_timeout: float = 2.0
    lag_limit: float = 1.0  # CPU seconds one task step may take (the event loop)
    rss_allowance: int = 320 * MiB  # memory growth allowed besides the requests' buffers
    flood_bytes: int = 64 * MiB  # a flood ends (the proxy closes) after this many bytes
    cancel_write_size: int = 8 * MiB

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(ALL_FAULTS)
        if unknown:
            raise InvalidArgumentError(f"unknown fault kinds {sorted(unknown)}; "
                                       f"choose from {', '.join(ALL_FAULTS)}")
        if self.server not in SERVER_KINDS and self.server_cmd is None:
            raise InvalidArgumentError(f"--server must be one of {', '.join(SERVER_KINDS)}")
        if self.size % self.block or self.size < 64 * self.block:
            raise InvalidArgumentError(f"size must be a multiple of {self.block} and at "
                                       f"least {64 * self.block}")
        if self.concurrency is None:
            self.concurrency = 4 * self.max_in_flight
        if self.concurrency < 1:
            raise InvalidArgumentError("concurrency must be at least 1")
        if self.connections < 1:
            raise InvalidArgumentError("connections must be at least 1")
        if self.max_outage + 2 >= self.reconnect_delay:
            raise InvalidArgumentError(
                f"reconnect_delay ({self.reconnect_delay}s) must exceed the longest outage "
                f"({self.max_outage}s) by more than 2s")
        if self.duration is None and self.ops is None:
            self.duration = 30.0

    @property
    def workers(self) -> int:
        assert self.concurrency is not None
        return self.concurrency

    @property
    def bound(self) -> float:
        """Longest time one operation may take before it counts as a hang."""
        return self.reconnect_delay + self.max_stall + 10.0

    @property
    def cancel_bound(self) -> float:
        """How long past its deadline a cancelled operation may take: it may finish
        sending (and then reading) for ``cancel_timeout``, plus scheduling."""
        return self.cancel_timeout + 1.0
