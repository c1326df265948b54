"""Sans-IO server side of the NBD handshake (fixed newstyle).

Theory of operation
-------------------
:class:`ServerNegotiator` starts with the greeting queued in ``data_to_send()``.  It is
fed the client's bytes and answers each option from a dispatch table
(:attr:`ServerNegotiator._options`), until the client enters transmission
(:class:`ExportChosen`), aborts (:class:`ClientAborted`) or breaks a rule that the spec
punishes with a hard disconnect (:class:`ProtocolError`: bad magic, unknown client
flags, EXPORT_NAME that cannot be honoured).

Hostile input never makes it allocate from a length: option data above
:data:`MAX_OPTION_REQUEST` is skipped as it streams in and answered with
``ERR_TOO_BIG``; strings are capped by the decoders.  A client gets at most
``max_options`` options (:data:`MAX_OPTIONS`) before it is a ProtocolError, and with
``step_options`` every answered option is an :class:`OptionAnswered` event, so the
caller sends the answer (and checkpoints) before the next option is even looked at:
a client that pipelines options and reads no replies holds one answer's worth of
output, not one per option it sent.

TLS modes follow the spec: OFF answers STARTTLS with ``ERR_UNSUP``; REQUIRE is
FORCEDTLS (every option but STARTTLS and ABORT gets ``ERR_TLS_REQD`` until TLS is up,
EXPORT_NAME disconnects); ALLOW lets the client choose.  A successful STARTTLS forgets
everything negotiated before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

from .constants import (
    BASE_ALLOCATION,
    MAX_OPTION_REQUEST,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from .errors import ProtocolError
from .events import NEED_DATA, ClientAborted, ExportChosen, StartTLS
from .negotiate import TLSMode
from .options import (
    CLIENT_FLAGS_SIZE,
    OPTION_HEADER_SIZE,
    decode_client_flags,
    decode_info_request,
    decode_meta_context_request,
    decode_option_header,
    decode_string,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_export,
    encode_info_string,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)

# int: ``~`` on an IntFlag keeps only the flags it names, so unknown bits would pass.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)

MAX_OPTIONS = 1024
"""Options one handshake may have (nbdkit allows 32; ``nbdinfo --list`` on a server
with many exports sends one NBD_OPT_INFO per export)."""


class OptionAnswered(NamedTuple):
    """With ``step_options``: the answer to ``option`` is queued in ``data_to_send()``."""

    option: int


@dataclass(frozen=True, slots=True)
class ExportOffer:
    """An export as the server offers it during the handshake."""

    name: str
    size: int
    flags: int  # transmission flags, without SEND_DF (added when structured replies are on)
    description: str = ""
    block_sizes: tuple[int, int, int] | None = None  # (minimum, preferred, maximum)
    contexts: Sequence[str] = (BASE_ALLOCATION,)


class _Reply(Exception):
    """Internal: answer the current option with an error reply and carry on."""

    def __init__(self, reply_type: OptionReply, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


class ServerNegotiator:
    """Drive the server side of one handshake.  See the module docstring."""

    def __init__(self, exports: Mapping[str, ExportOffer], *,
                 tls: TLSMode = TLSMode.OFF, structured: bool = True,
                 extended: bool = True, allow_list: bool = True,
                 default_export: str | None = None, step_options: bool = False,
                 max_options: int = MAX_OPTIONS) -> None:
        self.exports = exports
        self.step_options = step_options
        self.max_options = max_options
        self.options_received = 0
        self.last_option: int | None = None  # the option answered most recently
        self.last_export: str | None = None  # the export it named, if it named one
        self.tls_mode = tls
        self.offer_structured = structured
        self.offer_extended = extended and structured
        self.allow_list = allow_list
        self.default_export = default_export
        self.tls = False
        self.no_zeroes = False
        self.structured = False
        self.extended = False
        self.contexts: dict[int, str] = {}
        self._contexts_for: str | None = None  # export name the contexts were set for
        self._inbox = bytearray()
        self._outbox = bytearray(encode_greeting(HandshakeFlag.FIXED_NEWSTYLE
                                                 | HandshakeFlag.NO_ZEROES))
        self._phase = "client-flags"
        self._option: tuple[int, int] | None = None  # (option, data length) being read
        self._skip = 0  # bytes of oversized option data still to discard
        self._done = False
        self._options: dict[int, Callable[[int, bytes], object]] = {
            Option.ABORT: self._opt_abort,
            Option.LIST: self._opt_list,
            Option.STARTTLS: self._opt_starttls,
            Option.INFO: self._opt_info_go,
            Option.GO: self._opt_info_go,
            Option.STRUCTURED_REPLY: self._opt_structured_reply,
            Option.EXTENDED_HEADERS: self._opt_extended_headers,
            Option.LIST_META_CONTEXT: self._opt_meta_context,
            Option.SET_META_CONTEXT: self._opt_meta_context,
            Option.EXPORT_NAME: self._opt_export_name,
        }

    # --- the sans-IO surface ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._inbox += data

    def data_to_send(self) -> bytes:
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def leftover(self) -> bytes:
        """Bytes after the handshake (the first requests of the transmission phase)."""
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    def tls_started(self) -> None:
        """The TLS handshake finished; negotiation starts over inside TLS."""
        if self._phase != "tls-upgrade":
            raise RuntimeError("tls_started() without a StartTLS event")
        self.tls = True
        self.structured = self.extended = False
        self.contexts = {}
        self._contexts_for = None
        self._phase = "options"

    def next_event(self) -> object:
        """NEED_DATA, StartTLS, ExportChosen, ClientAborted, or (with ``step_options``)
        OptionAnswered; ProtocolError means disconnect now (after sending whatever is
        queued)."""
        while True:
            if self._done or self._phase == "tls-upgrade":
                return NEED_DATA
            if self._phase == "client-flags":
                if len(self._inbox) < CLIENT_FLAGS_SIZE:
                    return NEED_DATA
                self._client_flags(decode_client_flags(self._take(CLIENT_FLAGS_SIZE)))
                continue
            event = self._next_option()
            if event is not None:
                return event
            if self.step_options:
                assert self.last_option is not None
                return OptionAnswered(self.last_option)

    # --- internals ------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        return data

    def _client_flags(self, flags: int) -> None:
        if flags & ~_KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"client sent unknown flags 0x{flags:08x}")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._phase = "options"

    def _next_option(self) -> object:
        if self._skip:
            return NEED_DATA
        if self._option is None:
            if len(self._inbox) < OPTION_HEADER_SIZE:
                return NEED_DATA
            option, length = decode_option_header(self._take(OPTION_HEADER_SIZE))
            self.options_received += 1
            if self.options_received > self.max_options:
                raise ProtocolError(f"client sent more than {self.max_options} options")
            self.last_option, self.last_export = option, None
            if length > MAX_OPTION_REQUEST:
                skipped = min(length, len(self._inbox))
                del self._inbox[:skipped]
                self._skip = length - skipped
                self._reply(option, OptionReply.ERR_TOO_BIG,
                            f"option data of {length} bytes is too large")
                return None
            self._option = (option, length)
        option, length = self._option
        if len(self._inbox) < length:
            return NEED_DATA
        data = self._take(length)
        self._option = None
        return self._dispatch(option, data)

    def _dispatch(self, option: int, data: bytes) -> object:
        handler = self._options.get(option)
        try:
            if self.tls_mode is TLSMode.REQUIRE and not self.tls and option not in (
                    Option.STARTTLS, Option.ABORT):
                if option == Option.EXPORT_NAME:
                    raise ProtocolError("client chose an export without TLS, which this "
                                        "server requires")
                raise _Reply(OptionReply.ERR_TLS_REQD, "this server requires TLS")
            if handler is None:
                raise _Reply(OptionReply.ERR_UNSUP, f"option {option} is not supported")
            return handler(option, data)
        except _Reply as refusal:
            self._reply(option, refusal.reply_type, refusal.message)
            return None

    def _reply(self, option: int, reply_type: int, data: bytes | str = b"") -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")[:4096]
        self._outbox += encode_option_reply(option, reply_type, data)

    @staticmethod
    def _no_data(data: bytes) -> None:
        if data:
            raise _Reply(OptionReply.ERR_INVALID, "this option takes no data")

    def _lookup(self, name: str) -> ExportOffer:
        offer = self.exports.get(name)
        if offer is None and name == "" and self.default_export is not None:
            offer = self.exports.get(self.default_export)
        if offer is None:
            raise _Reply(OptionReply.ERR_UNKNOWN, f"no export named {name!r}")
        self.last_export = offer.name
        return offer

    def _flags(self, offer: ExportOffer) -> int:
        flags = offer.flags | TransmissionFlag.HAS_FLAGS
        if self.structured:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~int(TransmissionFlag.SEND_DF)  # keeps the bits it does not name
        return int(flags)

    # --- option handlers (each returns an event or None) ------------------------------

    def _opt_abort(self, option: int, data: bytes) -> object:
        self._reply(option, OptionReply.ACK)
        self._done = True
        return ClientAborted()

    def _opt_list(self, option: int, data: bytes) -> object:
        self._no_data(data)
        if not self.allow_list:
            raise _Reply(OptionReply.ERR_POLICY, "listing exports is disabled")
        for offer in self.exports.values():
            self._reply(option, OptionReply.SERVER,
                        encode_rep_server(offer.name, offer.description))
        self._reply(option, OptionReply.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> object:
        self._no_data(data)
        if self.tls_mode is TLSMode.OFF:
            raise _Reply(OptionReply.ERR_UNSUP, "TLS is not configured on this server")
        if self.tls:
            raise _Reply(OptionReply.ERR_INVALID, "TLS is already on")
        if self._inbox:  # CVE-2021-3716 (nbdkit): never act on plaintext sent behind it
            raise ProtocolError(f"client sent {len(self._inbox)} plaintext bytes after "
                                "STARTTLS, before the TLS handshake")
        self._reply(option, OptionReply.ACK)
        self._phase = "tls-upgrade"
        return StartTLS()

    def _opt_structured_reply(self, option: int, data: bytes) -> object:
        self._no_data(data)
        if not self.offer_structured:
            raise _Reply(OptionReply.ERR_UNSUP, "structured replies are disabled")
        if self.structured:
            raise _Reply(OptionReply.ERR_INVALID, "structured replies are already on")
        self.structured = True
        self._reply(option, OptionReply.ACK)
        return None

    def _opt_extended_headers(self, option: int, data: bytes) -> object:
        self._no_data(data)
        if not self.offer_extended:
            raise _Reply(OptionReply.ERR_UNSUP, "extended headers are disabled")
        if self.extended:
            raise _Reply(OptionReply.ERR_INVALID, "extended headers are already on")
        self.extended = self.structured = True
        self._reply(option, OptionReply.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> object:
        setting = option == Option.SET_META_CONTEXT
        if setting:  # SET replaces the selection even when it fails
            self.contexts, self._contexts_for = {}, None
        if not self.structured:
            raise _Reply(OptionReply.ERR_INVALID, "meta contexts need structured replies")
        try:
            name, queries = decode_meta_context_request(data)
        except ProtocolError as exc:
            raise _Reply(OptionReply.ERR_INVALID, exc.strerror or "bad request") from None
        offer = self._lookup(name)
        available = list(offer.contexts)
        if not queries:
            matches = [] if setting else available
        else:
            matches = []
            for query in queries:
                namespace = query.split(":", 1)[0] + ":"
                found = [c for c in available if c == query or
                         (not setting and query == namespace and c.startswith(namespace))]
                matches += [c for c in found if c not in matches]
        selected = {}
        for context_id, context in enumerate(matches, start=1):
            selected[context_id] = context
            self._reply(option, OptionReply.META_CONTEXT,
                        encode_rep_meta_context(context_id if setting else 0, context))
        if setting:
            self.contexts, self._contexts_for = selected, name
        self._reply(option, OptionReply.ACK)
        return None

    def _opt_info_go(self, option: int, data: bytes) -> object:
        try:
            name, infos = decode_info_request(data)
        except ProtocolError as exc:
            raise _Reply(OptionReply.ERR_INVALID, exc.strerror or "bad request") from None
        offer = self._lookup(name)
        flags = self._flags(offer)
        self._reply(option, OptionReply.INFO, encode_info_export(offer.size, flags))
        if Info.NAME in infos:
            self._reply(option, OptionReply.INFO, encode_info_string(Info.NAME, offer.name))
        if Info.DESCRIPTION in infos and offer.description:
            self._reply(option, OptionReply.INFO,
                        encode_info_string(Info.DESCRIPTION, offer.description))
        if offer.block_sizes is not None:  # sent even unasked: the server enforces them
            self._reply(option, OptionReply.INFO, encode_info_block_size(*offer.block_sizes))
        self._reply(option, OptionReply.ACK)
        if option == Option.INFO:
            return None
        return self._enter_transmission(name, offer, flags, Info.BLOCK_SIZE in infos)

    def _opt_export_name(self, option: int, data: bytes) -> object:
        if self.extended:
            raise ProtocolError("client used NBD_OPT_EXPORT_NAME after extended headers")
        try:
            name = decode_string(data, "export name")
            offer = self._lookup(name)
        except (ProtocolError, _Reply) as exc:
            # EXPORT_NAME cannot be answered with an error: the spec says disconnect.
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ProtocolError(f"cannot serve NBD_OPT_EXPORT_NAME: {why}") from None
        flags = self._flags(offer)
        self._outbox += encode_export_name_reply(offer.size, flags, no_zeroes=self.no_zeroes)
        return self._enter_transmission(name, offer, flags, False)

    def _enter_transmission(self, name: str, offer: ExportOffer, flags: int,
                            block_size_requested: bool) -> ExportChosen:
        contexts = self.contexts if self._contexts_for == name else {}
        self._done = True
        return ExportChosen(name=offer.name, structured=self.structured,
                            extended=self.extended, contexts=dict(contexts), flags=flags,
                            block_size_requested=block_size_requested)
