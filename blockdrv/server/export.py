"""An export of the embedded server: a backend plus what the server advertises for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.constants import DEFAULT_MAX_PAYLOAD, TransmissionFlag
from ..protocol.server_negotiate import ExportOffer
from .backends import Backend
from .faults import Faults

_ALWAYS = (TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
           | TransmissionFlag.SEND_CACHE | TransmissionFlag.ROTATIONAL)
_WRITING = TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES


@dataclass(eq=False)
class Export:
    """A named export: its backend, flags, block sizes and fault hooks.

    Several connections to one export share its backend, so the export can advertise
    CAN_MULTI_CONN: a flush on any connection covers the writes replied to on all
    (``multi_conn=False`` stops advertising it).
    """

    name: str
    backend: Backend
    read_only: bool = False
    description: str = ""
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD
    faults: Faults = field(default_factory=Faults)
    multi_conn: bool = True

    def __post_init__(self) -> None:
        if self.min_block & (self.min_block - 1) or not 1 <= self.min_block <= 65536:
            raise ValueError(f"minimum block size {self.min_block} must be a power of two "
                             "up to 65536")
        if self.preferred_block & (self.preferred_block - 1) or \
                self.preferred_block < max(self.min_block, 512):
            raise ValueError(f"preferred block size {self.preferred_block} must be a power "
                             "of two of at least 512 and the minimum")
        if self.max_payload % self.min_block or self.max_payload < self.min_block:
            raise ValueError(f"maximum payload {self.max_payload} must be a multiple of the "
                             f"minimum block size {self.min_block}")

    @property
    def size(self) -> int:
        """Size in bytes (the backend's)."""
        return self.backend.size

    @property
    def flags(self) -> int:
        """Transmission flags: what the backend serves (its ``features``), read-only and
        multi-conn as set here (SEND_DF is added by the handshake when it applies)."""
        features = self.backend.features
        flags = TransmissionFlag.HAS_FLAGS | (features & _ALWAYS)
        if self.multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= features & _WRITING
            if self.backend.fast_zero and features & TransmissionFlag.SEND_WRITE_ZEROES:
                flags |= TransmissionFlag.SEND_FAST_ZERO
        return int(flags)

    def offer(self) -> ExportOffer:
        """What the handshake tells clients about this export."""
        return ExportOffer(name=self.name, size=self.size, flags=self.flags,
                           description=self.description,
                           block_sizes=(self.min_block, self.preferred_block,
                                        self.max_payload),
                           contexts=tuple(self.backend.contexts))
