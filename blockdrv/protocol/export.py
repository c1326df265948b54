"""What a client knows about an export after the handshake, and what it may send to it.

:class:`ExportInfo` is the result of negotiation (size, transmission flags, block sizes,
meta contexts, header style).  Its ``can_*`` names follow ``nbdinfo --json``.
:func:`check_request` applies the spec's client-side rules to a request before anything
is sent: the command and flags must be advertised, the range inside the export and
aligned to the minimum block size, the length within the limit for that command.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Mapping

from .constants import (
    ALLOWED_COMMAND_FLAGS,
    DEFAULT_MAX_PAYLOAD,
    WRITING_COMMANDS,
    Command,
    CommandFlag,
    TransmissionFlag,
)
from .errors import InvalidArgumentError, UnsupportedError

_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One export named by NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """An export as negotiated: everything the transmission phase depends on."""

    name: str
    size: int
    flags: int
    block_size_minimum: int | None = None
    block_size_preferred: int | None = None
    block_size_maximum: int | None = None
    description: str | None = None
    structured: bool = False
    extended: bool = False
    contexts: Mapping[str, int] = field(default_factory=dict)
    tls: bool = False
    protocol: str = "newstyle-fixed"

    # --- flags, named as nbdinfo --json names them ---
    def _flag(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def is_read_only(self) -> bool:
        """The export refuses writes."""
        return self._flag(TransmissionFlag.READ_ONLY)

    @property
    def is_rotational(self) -> bool:
        """The export says it is on rotational media."""
        return self._flag(TransmissionFlag.ROTATIONAL)

    @property
    def can_flush(self) -> bool:
        """The server accepts FLUSH."""
        return self._flag(TransmissionFlag.SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        """The server accepts FUA (force unit access) on writes."""
        return self._flag(TransmissionFlag.SEND_FUA)

    @property
    def can_trim(self) -> bool:
        """The server accepts TRIM."""
        return self._flag(TransmissionFlag.SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        """The server accepts WRITE_ZEROES."""
        return self._flag(TransmissionFlag.SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        """The server accepts FAST_ZERO on WRITE_ZEROES."""
        return self._flag(TransmissionFlag.SEND_FAST_ZERO)

    @property
    def can_df(self) -> bool:
        """The server honours DF (don't fragment) on READ."""
        return self._flag(TransmissionFlag.SEND_DF)

    @property
    def can_multi_conn(self) -> bool:
        """Several connections may be used at once (CAN_MULTI_CONN)."""
        return self._flag(TransmissionFlag.CAN_MULTI_CONN)

    @property
    def can_cache(self) -> bool:
        """The server accepts CACHE."""
        return self._flag(TransmissionFlag.SEND_CACHE)

    @property
    def can_block_status(self) -> bool:
        """BLOCK_STATUS can be sent (structured replies and a negotiated context)."""
        return self.structured and bool(self.contexts)

    # --- limits ---
    @property
    def min_block(self) -> int:
        """Alignment every offset and length must respect (1 when not advertised)."""
        return self.block_size_minimum or 1

    @property
    def max_payload(self) -> int:
        """Largest READ or WRITE to send in one request."""
        limit = self.block_size_maximum
        if limit is None or limit == _U32_MAX:
            limit = DEFAULT_MAX_PAYLOAD
        return max(self.min_block, limit - limit % self.min_block)

    def max_length(self, command: int, flags: int = 0) -> int:
        """Largest length one request of this command may carry (split above it)."""
        if command in (Command.READ, Command.WRITE):
            return self.max_payload
        limited = command == Command.CACHE or (
            command == Command.WRITE_ZEROES and not flags & CommandFlag.FAST_ZERO)
        if limited and self.block_size_maximum not in (None, _U32_MAX):
            limit = self.block_size_maximum
        else:
            limit = max(self.size, 1) if self.extended else _U32_MAX
        assert limit is not None
        return max(self.min_block, limit - limit % self.min_block)

    def describe(self) -> dict[str, object]:
        """The export as ``nbdinfo --json`` names its fields (where they overlap)."""
        return {
            "export-name": self.name,
            "description": self.description,
            "export-size": self.size,
            "protocol": self.protocol,
            "TLS": self.tls,
            "is_rotational": self.is_rotational,
            "is_read_only": self.is_read_only,
            "can_cache": self.can_cache,
            "can_df": self.can_df,
            "can_fast_zero": self.can_fast_zero,
            "can_flush": self.can_flush,
            "can_fua": self.can_fua,
            "can_multi_conn": self.can_multi_conn,
            "can_trim": self.can_trim,
            "can_zero": self.can_zero,
            "block_size_minimum": self.block_size_minimum,
            "block_size_preferred": self.block_size_preferred,
            "block_size_maximum": self.block_size_maximum,
            "contexts": sorted(self.contexts),
            "structured": self.structured,
            "extended": self.extended,
        }


_COMMAND_FLAG = {
    Command.FLUSH: (TransmissionFlag.SEND_FLUSH, "flush"),
    Command.TRIM: (TransmissionFlag.SEND_TRIM, "trim"),
    Command.WRITE_ZEROES: (TransmissionFlag.SEND_WRITE_ZEROES, "write zeroes"),
    Command.CACHE: (TransmissionFlag.SEND_CACHE, "cache"),
}
_RANGELESS = (Command.FLUSH, Command.DISC)
# Which request flags need a transmission flag first.
_FLAG_NEEDS = {
    CommandFlag.FUA: (TransmissionFlag.SEND_FUA, "FUA"),
    CommandFlag.DF: (TransmissionFlag.SEND_DF, "DF (don't fragment)"),
    CommandFlag.FAST_ZERO: (TransmissionFlag.SEND_FAST_ZERO, "fast zero"),
}


def check_request(info: ExportInfo, command: int, offset: int, length: int,
                  flags: int = 0) -> None:
    """Refuse a request the client must not send; raise before anything goes out.

    UnsupportedError (ENOTSUP, or EPERM for writes to a read-only export) for commands
    and flags the export did not advertise; InvalidArgumentError (EINVAL) for ranges
    outside the export, unaligned ranges and lengths over the command's limit.
    """
    try:
        cmd = Command(command)
    except ValueError:
        raise InvalidArgumentError(f"unknown command {command}") from None
    name = cmd.name
    if cmd in WRITING_COMMANDS and info.is_read_only:
        raise UnsupportedError(f"{name}: the export is read-only", errno=errno.EPERM)
    need = _COMMAND_FLAG.get(cmd)
    if need is not None and not info.flags & need[0]:
        raise UnsupportedError(f"{name}: the server does not support {need[1]}")
    if cmd == Command.BLOCK_STATUS and not info.can_block_status:
        raise UnsupportedError("BLOCK_STATUS: no metadata context was negotiated")
    if cmd == Command.RESIZE:
        raise UnsupportedError("RESIZE is not supported")
    extra = flags & ~int(ALLOWED_COMMAND_FLAGS[cmd])  # int: unknown bits count too
    if extra:
        raise InvalidArgumentError(f"{name}: flag {CommandFlag(extra)!r} is not valid here")
    for flag, (needed, what) in _FLAG_NEEDS.items():
        if flags & flag and not info.flags & needed:
            raise UnsupportedError(f"{name}: the server does not support {what}")
    if cmd in _RANGELESS:
        if offset or length:
            raise InvalidArgumentError(f"{name}: offset and length must be 0")
        return
    if offset < 0 or length < 0:
        raise InvalidArgumentError(f"{name}: negative offset or length")
    if offset + length > info.size:
        raise InvalidArgumentError(
            f"{name}: range {offset}+{length} is beyond the export size {info.size}")
    align = info.min_block
    if offset % align or length % align:
        raise InvalidArgumentError(
            f"{name}: offset {offset} and length {length} must be multiples of the "
            f"minimum block size {align}")
    limit = info.max_length(cmd, flags)
    if length > limit:
        raise InvalidArgumentError(f"{name}: length {length} is over the limit {limit}")


def incompatibility(old: ExportInfo, new: ExportInfo) -> str | None:
    """Why ``new`` cannot stand in for ``old`` (None: it can): the one rule for a
    reconnect's export and for a multi-conn device's extra connections.  ``new`` must
    have the same size and TLS use, offer every capability, negotiated feature and meta
    context ``old`` offered, and be no stricter about block sizes; offering more is fine
    (the device only uses what ``old`` offered).
    """
    if new.size != old.size:
        return f"size changed from {old.size} to {new.size}"
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_df", "can_cache"):
        if getattr(old, flag) and not getattr(new, flag):
            return f"{flag} is no longer offered"
    if new.is_read_only and not old.is_read_only:
        return "the export became read-only"
    if old.structured and not new.structured:
        return "structured replies are no longer offered"
    if old.extended and not new.extended:
        return "extended headers are no longer offered"
    missing = set(old.contexts) - set(new.contexts)
    if missing:
        return f"meta contexts {sorted(missing)} are no longer offered"
    if new.min_block > old.min_block or new.max_payload < old.max_payload:
        return "block size constraints became stricter"
    if new.tls != old.tls:
        return "TLS use changed"
    return None
