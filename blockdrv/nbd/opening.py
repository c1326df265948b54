"""Opening an export for a command: the client options every command takes, and one-line
errors that name the address once.

Theory of operation
-------------------
Every client command (``info``, ``list``, ``map``, ``copy``, ``bench``) takes the same
three knobs, gathered in :class:`ClientOptions`: ``reconnect_delay`` (how long requests
wait for a reconnect after the connection is lost), ``open_timeout`` (how long to keep
trying the first connection) and ``connect_timeout`` (how long one attempt, connect plus
handshake, may take: a server that accepts and says nothing ends there).

:func:`open_device` is :func:`blockdrv.open_nbd` with those options; when the open
fails it raises :class:`~blockdrv.nbd.ConnectError` with one line for a person: the
address once and the reason (``cannot connect to localhost:10809: Connection
refused``), an export the server does not have with a pointer to ``blockdrv list``.

:func:`ask` puts a handshake-only question (NBD_OPT_LIST, LIST_META_CONTEXT) under the
same options, reusing the driver's connection worker for the retries: one attempt
bounded by ``connect_timeout``, or retries with backoff for ``open_timeout`` seconds.
"""

from __future__ import annotations

import errno
import os
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import trio

from ..protocol.constants import OptionReply
from ..protocol.errors import NBDError, OptionError
from ..protocol.uri import NBDAddress
from . import ConnectError, Device, open_nbd
from .connection import ClientConnection
from .open import address_of

T = TypeVar("T")


@dataclass(frozen=True)
class ClientOptions:
    """What every client command passes to the driver (see the module docstring)."""

    reconnect_delay: float = 0.0
    open_timeout: float = 0.0
    connect_timeout: float = 30.0

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`blockdrv.open_nbd`."""
        return {"reconnect_delay": self.reconnect_delay, "open_timeout": self.open_timeout,
                "connect_timeout": self.connect_timeout}


def explain_open_failure(exc: BaseException, address: NBDAddress,
                         options: ClientOptions) -> str:
    """One line saying why ``address`` could not be opened, naming it once."""
    where = address.display
    if isinstance(exc, OptionError) and exc.reply_type == OptionReply.ERR_UNKNOWN:
        said = f" (the server said: {exc.server_message})" if exc.server_message else ""
        listing = str(replace(address, export=""))
        return (f"{where} has no export named {address.export!r}{said}; "
                f"'blockdrv list {listing}' shows the exports it has")
    cause = exc.__cause__ if isinstance(exc, ConnectError) and exc.__cause__ else exc
    after = (f" (still failing after {options.open_timeout:g}s)"
             if options.open_timeout > 0 else "")
    if isinstance(cause, (TimeoutError, trio.TooSlowError)):
        return (f"{where}: no answer within {options.connect_timeout:g}s "
                f"(--connect-timeout){after}")
    if isinstance(cause, NBDError):
        return f"{where}: {cause.strerror}{after}"
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"cannot connect to {where}: {os.strerror(cause.errno)}{after}"
    text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
    return f"{where}: {text}{after}"


def _opening_failed(exc: BaseException, address: NBDAddress,
                    options: ClientOptions) -> ConnectError:
    code = getattr(exc, "errno", None) or errno.EIO
    failure = ConnectError(explain_open_failure(exc, address, options), errno=code)
    failure.__cause__ = exc
    return failure


@asynccontextmanager
async def open_device(target: str | NBDAddress, options: ClientOptions,
                      **kwargs: Any) -> AsyncIterator[Device]:
    """:func:`blockdrv.open_nbd` with ``options`` (and ``kwargs``); an open that fails
    raises ConnectError with one line from :func:`explain_open_failure`."""
    address = address_of(target, kwargs.pop("export", None))
    async with AsyncExitStack() as stack:
        try:
            device = await stack.enter_async_context(
                open_nbd(address, **options.open_kwargs(), **kwargs))
        except OSError as exc:  # NBDError included
            raise _opening_failed(exc, address, options) from exc
        yield device


async def _nothing_to_close(result: object) -> None:
    pass


async def ask(question: Callable[[], Awaitable[T]], address: NBDAddress,
              options: ClientOptions) -> T:
    """The answer of ``question`` (a handshake-only query of ``address``), asked once
    within ``connect_timeout`` or, with ``open_timeout``, again until that runs out."""
    result: T | None = None
    async with trio.open_nursery() as nursery:
        worker: ClientConnection[T] = ClientConnection(
            question, nursery, close_result=_nothing_to_close,
            attempt_timeout=options.connect_timeout)
        result = await worker.first(options.open_timeout)
        error = worker.error
        await worker.close()
    if result is None:
        failure = error or TimeoutError()
        raise _opening_failed(failure, address, options) from failure
    return result
