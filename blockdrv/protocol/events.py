"""Events the sans-IO state machines return from ``next_event()``.

Like h11: feed bytes in with ``receive_data()``, pull events out until
:data:`NEED_DATA` comes back, and send whatever ``data_to_send()`` holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .errors import RequestError
    from .export import ExportEntry, ExportInfo


class _NeedData:
    """Sentinel: nothing more can happen until more bytes are received."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


# --- handshake ------------------------------------------------------------------------


class StartTLS(NamedTuple):
    """The server accepted STARTTLS: wrap the stream in TLS now, then call
    ``tls_started()``; every later byte goes through TLS."""


class Negotiated(NamedTuple):
    """The handshake is over; transmission starts with this export."""

    info: ExportInfo


class ExportsListed(NamedTuple):
    """Reply to NBD_OPT_LIST: the exports the server is willing to name."""

    exports: list[ExportEntry]


class ExportDescribed(NamedTuple):
    """Reply to NBD_OPT_INFO: the export, without entering transmission."""

    info: ExportInfo


class MetaContextsListed(NamedTuple):
    """Reply to NBD_OPT_LIST_META_CONTEXT: context names the server offers."""

    contexts: list[str]


# --- transmission ---------------------------------------------------------------------


class ReadData(NamedTuple):
    """Bytes of a READ reply for the export range starting at ``offset``.

    A large data chunk arrives as several events so nothing has to be buffered whole.
    """

    cookie: int
    offset: int
    data: bytes


class ReadHole(NamedTuple):
    """A READ reply range that reads as zeroes (OFFSET_HOLE chunk)."""

    cookie: int
    offset: int
    length: int


class BlockStatus(NamedTuple):
    """One context's extents, [(length, flags), ...], starting at the request offset."""

    cookie: int
    context_id: int
    extents: list[tuple[int, int]]


class ReplyDone(NamedTuple):
    """The whole reply to a request has arrived; ``error`` is None on success."""

    cookie: int
    error: RequestError | None


# --- server side of the handshake -------------------------------------------------------


class ExportChosen(NamedTuple):
    """The client entered transmission (GO or EXPORT_NAME) with this export."""

    name: str
    structured: bool
    extended: bool
    contexts: dict[int, str]  # selected meta contexts by id
    flags: int  # transmission flags as sent to the client
    block_size_requested: bool


class ClientAborted(NamedTuple):
    """The client sent NBD_OPT_ABORT; send what is queued and close."""
