"""The blockdrv error hierarchy (DESIGN.md section 4).

Every error the library raises on purpose is an :class:`NBDError`, which is an
:class:`OSError` carrying an errno, so ``except OSError`` and ``e.errno`` work the way
they do for a local disk:

- :class:`RequestError`: the server answered a request with an error (its errno).
- :class:`OptionError`: the server refused an option during the handshake.
- :class:`ConnectionLostError` (EIO): the connection is gone and the retry window closed.
- :class:`ProtocolError` (EPROTO): the peer broke the protocol; the connection is dead.
- :class:`UnsupportedError` (ENOTSUP): the export does not offer that command or flag.
- :class:`InvalidArgumentError` (EINVAL, also a ValueError): a bad argument (a value
  or a type), refused before anything is sent.  Every public call uses it for bad
  arguments, so ``except ValueError`` keeps working.
- :class:`ConnectError` (a ConnectionLostError): the device could not be opened.
- :class:`DeadlockError` (EDEADLK): the call would wait for itself forever.
"""

from __future__ import annotations

import errno as _errno
import os


class NBDError(OSError):
    """Base of every blockdrv error: an OSError with ``errno`` and a message."""

    default_errno = _errno.EIO

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        code = self.default_errno if errno is None else errno
        super().__init__(code, message)


class ProtocolError(NBDError):
    """The peer violated the NBD protocol; the stream cannot be trusted any more."""

    default_errno = _errno.EPROTO


class RequestError(NBDError):
    """The server replied to a request with an error value.

    ``errno`` is the host errno of the server's error; ``server_message`` is the text of
    a structured error chunk (may be empty); ``offset`` is set for ERROR_OFFSET chunks.
    """

    def __init__(self, message: str, *, errno: int, server_message: str = "",
                 offset: int | None = None) -> None:
        super().__init__(message, errno=errno)
        self.server_message = server_message
        self.offset = offset


class OptionError(NBDError):
    """The server refused an option during the handshake.

    ``option`` and ``reply_type`` are the raw numbers; ``server_message`` is the text the
    server sent with its error reply (may be empty).
    """

    def __init__(self, message: str, *, errno: int, option: int, reply_type: int,
                 server_message: str = "") -> None:
        super().__init__(message, errno=errno)
        self.option = option
        self.reply_type = reply_type
        self.server_message = server_message


class ConnectionLostError(NBDError):
    """The connection to the server is lost and the request could not be completed."""

    default_errno = _errno.EIO


class UnsupportedError(NBDError):
    """The export does not support the command or flag asked for."""

    default_errno = _errno.ENOTSUP


class InvalidArgumentError(NBDError, ValueError):
    """A request or argument is invalid (unaligned, out of range, ...)."""

    default_errno = _errno.EINVAL


def describe_errno(code: int) -> str:
    """``EIO (Input/output error)`` style text for messages."""
    name = _errno.errorcode.get(code, str(code))
    return f"{name} ({os.strerror(code)})"


class ConnectError(ConnectionLostError):
    """The device could not be opened: no connection could be made or negotiated."""


class DeadlockError(NBDError):
    """The call would wait for itself forever (EDEADLK), e.g. I/O on a node from inside
    that node's own drained section: use the handle the section yields instead."""

    default_errno = _errno.EDEADLK


class TLSError(NBDError):
    """TLS could not be set up (refused, failed handshake, certificate problems)."""

    default_errno = _errno.EPROTO
