"""The connection settings of a device: one frozen object, checked once.

:func:`~blockdrv.open_nbd` takes about twenty keyword arguments.  They fall in two
groups: what every handshake asks for (export, structured and extended replies, meta
contexts, TLS: :class:`~blockdrv.nbd.handshake.HandshakeOptions`) and how the device
connects, waits and retries (:class:`ConnectionSettings`).  Both are built once, at the
top of ``open_nbd``, and checked as they are built, so a bad argument is an
:class:`~blockdrv.InvalidArgumentError` naming the parameter before anything is
connected; the layers below take the objects as they are and check nothing again.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from os import PathLike
from typing import Sequence

from ..io.tls import TLSMode
from ..protocol.errors import InvalidArgumentError
from .dispatch import MAX_SLOTS
from .handshake import StreamFactory


def _number(name: str, value: object, *, minimum: float = 0.0, positive: bool = False,
            integer: bool = False, maximum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise InvalidArgumentError(f"{name} must be {kind}, not {type(value).__name__}")
    if value < minimum or (positive and value <= 0) or value != value:  # NaN too
        bound = "positive" if positive else f"at least {minimum:g}"
        raise InvalidArgumentError(f"{name} must be {bound}, not {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{name} must be at most {maximum:g}, not {value!r}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True or False, not {value!r}")


def _optional_text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, (str, PathLike)):
        raise InvalidArgumentError(f"{name} must be a string or None, "
                                   f"not {type(value).__name__}")


@dataclass(frozen=True)
class ConnectionSettings:
    """How a device connects, waits and retries (the parameters of
    :func:`~blockdrv.open_nbd` of the same names); InvalidArgumentError on construction
    for a bad one."""

    reconnect_delay: float = 0.0
    open_timeout: float = 0.0
    max_in_flight: int = 16
    retry_initial: float = 1.0
    retry_max: float = 16.0
    socket_buffer_size: int | None = None
    guard_writes: bool = False
    connect_timeout: float = 30.0
    cancel_timeout: float = 5.0
    connections: int = 1
    stream_factory: StreamFactory | None = None

    def __post_init__(self) -> None:
        _number("reconnect_delay", self.reconnect_delay)
        _number("open_timeout", self.open_timeout)
        _number("max_in_flight", self.max_in_flight, minimum=1, integer=True,
                maximum=MAX_SLOTS)
        _number("retry_initial", self.retry_initial, positive=True)
        _number("retry_max", self.retry_max, positive=True)
        if self.retry_max < self.retry_initial:
            raise InvalidArgumentError(f"retry_max ({self.retry_max}) must not be below "
                                       f"retry_initial ({self.retry_initial})")
        _number("connect_timeout", self.connect_timeout, positive=True)
        _number("cancel_timeout", self.cancel_timeout, positive=True)
        _number("connections", self.connections, minimum=1, integer=True)
        if self.socket_buffer_size is not None:
            _number("socket_buffer_size", self.socket_buffer_size, positive=True,
                    integer=True)
        _flag("guard_writes", self.guard_writes)
        if self.stream_factory is not None and not callable(self.stream_factory):
            raise InvalidArgumentError("stream_factory must be an async callable, "
                                       f"not {type(self.stream_factory).__name__}")


def check_handshake_arguments(*, meta_contexts: object, structured: object,
                              extended: object, tls: object, tls_context: object,
                              tls_ca: object, tls_cert: object, tls_key: object,
                              tls_hostname: object) -> None:
    """InvalidArgumentError naming the first bad handshake or TLS argument of
    :func:`~blockdrv.open_nbd` (the TLS settings themselves are built by
    :func:`blockdrv.io.tls.client_settings`)."""
    if isinstance(meta_contexts, (str, bytes)) or not isinstance(meta_contexts, Sequence) \
            or not all(isinstance(c, str) for c in meta_contexts):
        raise InvalidArgumentError("meta_contexts must be a list of context names, "
                                   f"not {meta_contexts!r}")
    _flag("structured", structured)
    _flag("extended", extended)
    if tls is not None and not isinstance(tls, (TLSMode, str, bool)):
        raise InvalidArgumentError(f"tls must be 'off', 'allow', 'require', a TLSMode or "
                                   f"a bool, not {type(tls).__name__} (an SSLContext goes "
                                   "in tls_context=)")
    if tls_context is not None and not isinstance(tls_context, ssl.SSLContext):
        raise InvalidArgumentError(f"tls_context must be an ssl.SSLContext, "
                                   f"not {type(tls_context).__name__}")
    for name, value in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key),
                        ("tls_hostname", tls_hostname)):
        _optional_text(name, value)
