"""What a connection of the embedded server needs from it: settings and shared counters.

:class:`NBDServer` builds one :class:`ServerConfig` and one :class:`ServerCounters` and
hands both to every :class:`~blockdrv.server.connection.ServerConnection`; connections
never see the server object itself (so the two modules do not import each other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from trio_util import AsyncValue

from ..io.tls import NO_TLS, TLSSettings
from ..protocol.server_negotiate import ExportOffer
from .export import Export

MiB = 1024 * 1024

DEFAULT_BUFFER_BUDGET = 64 * MiB
"""Bytes one connection may hold for its requests (see :class:`ServerConfig`)."""


@dataclass(frozen=True, eq=False)
class ServerConfig:
    """A server's settings, as its connections see them.

    ``buffer_budget`` bounds what one connection makes the server hold: WRITE payloads
    received and not yet stored, plus the replies being produced or waiting to be sent
    (READ data above all, block status).  Each request is charged before it is read
    any further (its payload) or executed, and released when its reply has gone out;
    while a new request does not fit, the connection stops reading requests and TCP
    pushes back on the client.  A request alone may exceed the budget (a budget
    smaller than the maximum payload still serves it, one at a time).
    """

    exports: Mapping[str, Export]
    default_export: str
    structured: bool = True
    extended: bool = True
    allow_list: bool = True
    tls: TLSSettings = NO_TLS
    shuffle_replies: bool = False
    max_requests: int = 64
    buffer_budget: int = DEFAULT_BUFFER_BUDGET
    handshake_timeout: float = 10.0
    shutdown_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.default_export not in self.exports:
            raise ValueError(f"no export named {self.default_export!r} to be the default")
        if self.max_requests < 1 or self.buffer_budget < 1:
            raise ValueError("max_requests and buffer_budget must be positive")
        if self.handshake_timeout <= 0 or self.shutdown_timeout < 0:
            raise ValueError("the handshake timeout must be positive and the shutdown "
                             "timeout not negative")

    def offers(self) -> dict[str, ExportOffer]:
        """What the handshake tells clients about each export."""
        return {name: export.offer() for name, export in self.exports.items()}


@dataclass(eq=False)
class ServerCounters:
    """Counters every connection of a server updates."""

    connections_served: int = 0
    requests_served: int = 0
    #: Requests executing in a task of their own (a backend that waits, a fault hook),
    #: until their reply is queued; requests a memory backend answers at once are not
    #: counted.  Awaitable (``wait_value``).
    requests_in_progress: AsyncValue[int] = field(default_factory=lambda: AsyncValue(0))
