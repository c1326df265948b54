"""Sans-IO client side of the NBD handshake (fixed newstyle only).

Theory of operation
-------------------
:class:`ClientNegotiator` is fed the server's bytes (``receive_data``), hands back the
bytes to send (``data_to_send``) and reports progress as events (``next_event``), like
h11.  It never touches a socket, so the same object drives a blocking socket in a test,
a trio stream in the driver, or a fuzzer's byte strings.

After the greeting it walks a fixed *plan* of options, skipping the ones that do not
apply, then sends the *goal* option:

=====================  ===========================================  ====================
option                 sent when                                    on error
=====================  ===========================================  ====================
STARTTLS               tls is ALLOW or REQUIRE                      REQUIRE: fail; ALLOW:
                                                                    go on in plaintext
EXTENDED_HEADERS       extended headers wanted                      go on without
STRUCTURED_REPLY       structured replies wanted and not implied    go on without
                       by extended headers
SET_META_CONTEXT       structured replies are on and contexts were  go on without
                       asked for (goal GO or INFO)
goal: GO               always for a connection                      ERR_UNSUP: fall back
                                                                    to EXPORT_NAME (never
                                                                    after extended
                                                                    headers); else fail
goal: INFO / LIST /    for queries; ABORT follows                   fail
LIST_META_CONTEXT
=====================  ===========================================  ====================

Which option replies are acceptable for which option is a table too
(:data:`_REPLIES_FOR`); anything else is a :class:`ProtocolError`.  Error replies
become :class:`OptionError` carrying the server's message; before raising one, the
negotiator queues NBD_OPT_ABORT so the caller can end the session softly, as the spec
asks.  When STARTTLS is acknowledged the negotiator returns :class:`StartTLS` and waits
for ``tls_started()``; plaintext bytes that arrived after the acknowledgement are a
protocol error (they would otherwise be trusted as if they came through TLS).

A server can answer one option with many replies (INFO, SERVER, META_CONTEXT).  What the
negotiator keeps from them is bounded whatever the server sends: information replies
overwrite each other and at most :data:`~.constants.MAX_INFO_REPLIES` are taken, list
answers stop at :data:`~.constants.MAX_LIST_ENTRIES` entries or
:data:`~.constants.MAX_LIST_BYTES` bytes, and SET_META_CONTEXT accepts only the contexts
that were asked for, each once (a set lookup, not a scan).  Past a cap the handshake is a
ProtocolError naming it.  The caller's loop must still give other tasks a turn while
a fast server keeps it busy (the driver checkpoints once per read).
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .constants import (
    BASE_ALLOCATION,
    MAX_BLOCK_SIZE_MINIMUM,
    MAX_INFO_REPLIES,
    MAX_LIST_BYTES,
    MAX_LIST_ENTRIES,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    is_option_error,
)
from .errors import OptionError, ProtocolError
from .events import (
    NEED_DATA,
    ExportDescribed,
    ExportsListed,
    MetaContextsListed,
    Negotiated,
    StartTLS,
)
from .export import ExportEntry, ExportInfo
from .options import (
    EXPORT_NAME_REPLY_SIZE,
    EXPORT_NAME_ZEROES,
    GREETING_SIZE,
    OPTION_REPLY_HEADER_SIZE,
    decode_export_name_reply,
    decode_greeting,
    decode_info,
    decode_option_reply_header,
    decode_rep_meta_context,
    decode_rep_server,
    encode_client_flags,
    encode_info_request,
    encode_meta_context_request,
    encode_option,
    encode_string,
)


class TLSMode(enum.Enum):
    """Whether the client uses TLS: never, when the server offers it, or always."""

    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


class Goal(enum.Enum):
    """What the handshake is for."""

    GO = "go"  # enter transmission with the export
    INFO = "info"  # describe the export, then abort
    LIST = "list"  # list the exports, then abort
    LIST_META_CONTEXT = "list-meta-context"  # list the export's contexts, then abort


class Phase(enum.Enum):
    GREETING = "greeting"
    OPTION_REPLY = "option-reply"
    TLS_UPGRADE = "tls-upgrade"
    EXPORT_NAME_REPLY = "export-name-reply"
    DONE = "done"
    FAILED = "failed"


# Non-error reply types each option may receive; ACK always ends the option.
_REPLIES_FOR: dict[Option, frozenset[OptionReply]] = {
    Option.STARTTLS: frozenset({OptionReply.ACK}),
    Option.EXTENDED_HEADERS: frozenset({OptionReply.ACK}),
    Option.STRUCTURED_REPLY: frozenset({OptionReply.ACK}),
    Option.SET_META_CONTEXT: frozenset({OptionReply.META_CONTEXT, OptionReply.ACK}),
    Option.LIST_META_CONTEXT: frozenset({OptionReply.META_CONTEXT, OptionReply.ACK}),
    Option.GO: frozenset({OptionReply.INFO, OptionReply.ACK}),
    Option.INFO: frozenset({OptionReply.INFO, OptionReply.ACK}),
    Option.LIST: frozenset({OptionReply.SERVER, OptionReply.ACK}),
}

# Errors that end the handshake whatever option they answer.
_ALWAYS_FATAL = frozenset({OptionReply.ERR_SHUTDOWN, OptionReply.ERR_TLS_REQD})

_OPTION_ERRNO = {
    OptionReply.ERR_UNSUP: errno.ENOTSUP,
    OptionReply.ERR_POLICY: errno.EPERM,
    OptionReply.ERR_INVALID: errno.EINVAL,
    OptionReply.ERR_PLATFORM: errno.ENOTSUP,
    OptionReply.ERR_TLS_REQD: errno.EPERM,
    OptionReply.ERR_UNKNOWN: errno.ENOENT,
    OptionReply.ERR_SHUTDOWN: errno.ESHUTDOWN,
    OptionReply.ERR_BLOCK_SIZE_REQD: errno.EINVAL,
    OptionReply.ERR_TOO_BIG: errno.E2BIG,
    OptionReply.ERR_EXT_HEADER_REQD: errno.ENOTSUP,
}

_EXPLAIN = {
    OptionReply.ERR_UNSUP: "not supported by the server",
    OptionReply.ERR_POLICY: "refused by server policy",
    OptionReply.ERR_INVALID: "rejected as invalid",
    OptionReply.ERR_PLATFORM: "not available on the server's platform",
    OptionReply.ERR_TLS_REQD: "the server requires TLS",
    OptionReply.ERR_UNKNOWN: "no such export",
    OptionReply.ERR_SHUTDOWN: "the server is shutting down",
    OptionReply.ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    OptionReply.ERR_TOO_BIG: "request or reply too large",
    OptionReply.ERR_EXT_HEADER_REQD: "the server requires extended headers",
}

_GO_INFOS = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)


def _name(value: int, kind: type[enum.IntEnum]) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


def option_error(option: int, reply_type: int, message: str, export: str = "") -> OptionError:
    """The exception for an error reply to ``option`` (used by the driver too)."""
    try:
        known: OptionReply | None = OptionReply(reply_type)
    except ValueError:
        known = None
    explain = _EXPLAIN.get(known, f"error {reply_type:#x}") if known else \
        f"error {reply_type:#x}"
    text = f"NBD_OPT_{_name(option, Option)}"
    if export and option in (Option.GO, Option.INFO, Option.EXPORT_NAME):
        text += f" for export {export!r}"
    text += f": {explain}"
    if message:
        text += f" (server said: {message})"
    code = _OPTION_ERRNO.get(known, errno.EIO) if known else errno.EIO
    return OptionError(text, errno=code, option=option, reply_type=reply_type,
                       server_message=message)


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """Reject advertised block sizes that break the spec's constraints."""
    def power_of_two(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not power_of_two(minimum) or minimum > MAX_BLOCK_SIZE_MINIMUM:
        raise ProtocolError(f"server minimum block size {minimum} is not a power of two "
                            f"up to {MAX_BLOCK_SIZE_MINIMUM}")
    if not power_of_two(preferred) or preferred < max(minimum, 512):
        raise ProtocolError(f"server preferred block size {preferred} is not a power of two "
                            f"of at least max(minimum, 512)")
    if maximum != 0xFFFFFFFF and (maximum < minimum or maximum % minimum):
        raise ProtocolError(f"server maximum block size {maximum} is not a multiple of the "
                            f"minimum {minimum}")


class ClientNegotiator:
    """Drive the client side of one handshake. See the module docstring."""

    def __init__(self, export: str = "", *, goal: Goal = Goal.GO,
                 tls: TLSMode = TLSMode.OFF, structured: bool = True,
                 extended: bool = True, meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
                 allow_export_name_fallback: bool = True) -> None:
        encode_string(export, "export name")  # ValueError early for a bad name
        for context in meta_contexts:
            encode_string(context, "meta context")
        self.export = export
        self.goal = goal
        self.tls_mode = tls
        self.want_structured = structured or extended
        self.want_extended = extended
        self.meta_contexts = tuple(dict.fromkeys(meta_contexts))
        self._asked = frozenset(self.meta_contexts)
        self.allow_export_name_fallback = allow_export_name_fallback

        self.phase = Phase.GREETING
        self.handshake_flags = 0
        self.no_zeroes = False
        self.tls = False
        self.structured = False
        self.extended = False
        self.contexts: dict[str, int] = {}
        self._tried: set[Option] = set()
        self._option: Option | None = None
        self._infos = _Infos()
        self._selected: dict[str, int] = {}  # SET_META_CONTEXT: name -> id
        self._selected_ids: set[int] = set()
        self._entries: list[ExportEntry] = []
        self._context_names: dict[str, None] = {}  # LIST_META_CONTEXT, in order, once each
        self._replies = 0  # non-final replies to the pending option
        self._reply_bytes = 0
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._handlers: dict[Phase, Callable[[], object]] = {
            Phase.GREETING: self._on_greeting,
            Phase.OPTION_REPLY: self._on_option_reply,
            Phase.TLS_UPGRADE: lambda: NEED_DATA,
            Phase.EXPORT_NAME_REPLY: self._on_export_name_reply,
            Phase.DONE: lambda: NEED_DATA,
        }
        # The plan: options tried in order while their condition holds.
        self._plan: tuple[tuple[Option, Callable[[], bool]], ...] = (
            (Option.STARTTLS, lambda: self.tls_mode is not TLSMode.OFF),
            (Option.EXTENDED_HEADERS, lambda: self.want_extended),
            (Option.STRUCTURED_REPLY, lambda: self.want_structured and not self.structured),
            (Option.SET_META_CONTEXT, lambda: self.structured and bool(self.meta_contexts)
             and self.goal in (Goal.GO, Goal.INFO)),
        )

    # --- the sans-IO surface ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the server (already decrypted once TLS is on)."""
        self._inbox += data

    def data_to_send(self) -> bytes:
        """Bytes to write to the server now (may be empty)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def next_event(self) -> object:
        """NEED_DATA, StartTLS, Negotiated, ExportDescribed, ExportsListed or
        MetaContextsListed; raises OptionError / ProtocolError on failure."""
        if self.phase is Phase.FAILED:
            raise ProtocolError("the handshake already failed")
        try:
            while True:
                event = self._handlers[self.phase]()
                if event is not None:
                    return event
        except OptionError:
            self.phase = Phase.FAILED
            raise
        except ProtocolError:
            self.phase = Phase.FAILED
            self._outbox.clear()  # hard disconnect: nothing more to say
            raise

    def tls_started(self) -> None:
        """The caller finished the TLS handshake; negotiation continues inside TLS."""
        if self.phase is not Phase.TLS_UPGRADE:
            raise RuntimeError("tls_started() without a StartTLS event")
        self.tls = True
        self.phase = Phase.OPTION_REPLY
        self._send_next_option()

    def leftover(self) -> bytes:
        """Bytes received after the handshake ended (belong to the transmission phase)."""
        data = bytes(self._inbox)
        self._inbox.clear()
        return data

    def abort(self) -> bytes:
        """Bytes of a soft disconnect (NBD_OPT_ABORT) if the handshake is still haggling."""
        if self.phase in (Phase.OPTION_REPLY, Phase.FAILED) and self.handshake_flags:
            self.phase = Phase.FAILED
            return encode_option(Option.ABORT)
        return b""

    # --- phases ---------------------------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._inbox) < n:
            return None
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        return data

    def _on_greeting(self) -> object:
        data = self._take(GREETING_SIZE)
        if data is None:
            return NEED_DATA
        flags = decode_greeting(data)
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError("server does not support fixed newstyle negotiation")
        self.handshake_flags = flags
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        client_flags = ClientFlag.FIXED_NEWSTYLE
        if self.no_zeroes:
            client_flags |= ClientFlag.NO_ZEROES
        self._outbox += encode_client_flags(client_flags)
        self.phase = Phase.OPTION_REPLY
        self._send_next_option()
        return None

    def _send_next_option(self) -> None:
        for option, wanted in self._plan:
            if option not in self._tried and wanted():
                self._send(option)
                return
        goal_option = {Goal.GO: Option.GO, Goal.INFO: Option.INFO, Goal.LIST: Option.LIST,
                       Goal.LIST_META_CONTEXT: Option.LIST_META_CONTEXT}[self.goal]
        self._send(goal_option)

    def _send(self, option: Option) -> None:
        self._tried.add(option)
        self._option = option
        self._infos = _Infos()
        self._selected = {}
        self._selected_ids = set()
        self._replies = self._reply_bytes = 0
        if option in (Option.GO, Option.INFO):
            data = encode_info_request(self.export, _GO_INFOS)
        elif option == Option.SET_META_CONTEXT:
            data = encode_meta_context_request(self.export, self.meta_contexts)
        elif option == Option.LIST_META_CONTEXT:
            data = encode_meta_context_request(self.export, self.meta_contexts)
        elif option == Option.EXPORT_NAME:
            data = encode_string(self.export, "export name")
        else:
            data = b""
        self._outbox += encode_option(option, data)
        if option == Option.EXPORT_NAME:
            self.phase = Phase.EXPORT_NAME_REPLY

    def _on_option_reply(self) -> object:
        if len(self._inbox) < OPTION_REPLY_HEADER_SIZE:
            return NEED_DATA
        option, reply_type, length = decode_option_reply_header(self._inbox)
        if len(self._inbox) < OPTION_REPLY_HEADER_SIZE + length:
            return NEED_DATA
        del self._inbox[:OPTION_REPLY_HEADER_SIZE]
        data = self._take(length)
        assert data is not None
        current = self._option
        assert current is not None
        if option != current:
            raise ProtocolError(f"server replied to option {_name(option, Option)} while "
                                f"NBD_OPT_{current.name} was pending")
        if is_option_error(reply_type):
            message = data.decode("utf-8", "replace")[:4096]
            return self._on_error(current, reply_type, message)
        if reply_type not in _REPLIES_FOR[current]:
            raise ProtocolError(f"unexpected reply {_name(reply_type, OptionReply)} to "
                                f"NBD_OPT_{current.name}")
        if reply_type == OptionReply.ACK:
            if length:
                raise ProtocolError(f"ACK to NBD_OPT_{current.name} carries {length} bytes")
            return self._on_ack(current)
        self._on_partial(current, reply_type, data)
        return None

    def _on_partial(self, option: Option, reply_type: int, data: bytes) -> None:
        """A reply that is not the last one for ``option`` (INFO, SERVER, META_CONTEXT).

        Whatever a server sends, what is kept stays small: INFO replies overwrite each
        other and are counted (:data:`MAX_INFO_REPLIES`), list entries are capped in
        number and bytes (:data:`MAX_LIST_ENTRIES`, :data:`MAX_LIST_BYTES`), and only the
        contexts asked for are accepted, each once.
        """
        self._replies += 1
        self._reply_bytes += OPTION_REPLY_HEADER_SIZE + len(data)
        if reply_type == OptionReply.INFO:
            if self._replies > MAX_INFO_REPLIES:
                raise ProtocolError(f"server sent more than {MAX_INFO_REPLIES} information "
                                    f"replies to NBD_OPT_{option.name} (MAX_INFO_REPLIES)")
            self._infos.record(*decode_info(data))
            return
        if self._replies > MAX_LIST_ENTRIES or self._reply_bytes > MAX_LIST_BYTES:
            raise ProtocolError(f"server's answer to NBD_OPT_{option.name} is longer than "
                                f"{MAX_LIST_ENTRIES} entries or {MAX_LIST_BYTES} bytes "
                                "(MAX_LIST_ENTRIES, MAX_LIST_BYTES)")
        if reply_type == OptionReply.SERVER:
            name, description = decode_rep_server(data)
            self._entries.append(ExportEntry(name, description))
        elif reply_type == OptionReply.META_CONTEXT:
            context_id, name = decode_rep_meta_context(data)
            if option == Option.LIST_META_CONTEXT:
                self._context_names[name] = None
                return
            if name not in self._asked:
                raise ProtocolError(f"server selected meta context {name!r}, which was not "
                                    f"asked for (asked: {', '.join(self.meta_contexts)})")
            if name in self._selected or context_id in self._selected_ids:
                raise ProtocolError(f"meta context {name!r} (id {context_id}) selected twice")
            self._selected[name] = context_id
            self._selected_ids.add(context_id)

    def _on_ack(self, option: Option) -> object:
        if option == Option.STARTTLS:
            if self._inbox:
                raise ProtocolError(f"server sent {len(self._inbox)} plaintext bytes after "
                                    "acknowledging STARTTLS")
            self.phase = Phase.TLS_UPGRADE
            return StartTLS()
        if option == Option.EXTENDED_HEADERS:
            self.extended = self.structured = True
        elif option == Option.STRUCTURED_REPLY:
            self.structured = True
        elif option == Option.SET_META_CONTEXT:
            self.contexts = dict(self._selected)
        elif option in (Option.GO, Option.INFO):
            info = self._export_info()
            if option == Option.GO:
                self.phase = Phase.DONE
                return Negotiated(info)
            return self._finish_query(ExportDescribed(info))
        elif option == Option.LIST:
            return self._finish_query(ExportsListed(list(self._entries)))
        elif option == Option.LIST_META_CONTEXT:
            return self._finish_query(MetaContextsListed(list(self._context_names)))
        self._send_next_option()
        return None

    def _finish_query(self, event: object) -> object:
        self._outbox += encode_option(Option.ABORT)
        self.phase = Phase.DONE
        return event

    def _on_error(self, option: Option, reply_type: int, message: str) -> object:
        if reply_type not in _ALWAYS_FATAL:
            if option in (Option.EXTENDED_HEADERS, Option.STRUCTURED_REPLY,
                          Option.SET_META_CONTEXT):
                self._send_next_option()  # optional feature: go on without it
                return None
            if option == Option.STARTTLS and self.tls_mode is TLSMode.ALLOW:
                self._send_next_option()  # opportunistic TLS: go on in plaintext
                return None
            if (option == Option.GO and reply_type == OptionReply.ERR_UNSUP
                    and not self.extended and self.allow_export_name_fallback):
                self._send(Option.EXPORT_NAME)
                return None
        error = option_error(option, reply_type, message, self.export)
        if option == Option.STARTTLS:
            error = OptionError(f"TLS is required but the server refused STARTTLS: "
                                f"{error.strerror}", errno=errno.EPERM, option=option,
                                reply_type=reply_type, server_message=message)
        self._outbox += encode_option(Option.ABORT)  # soft disconnect, as the spec asks
        raise error

    def _on_export_name_reply(self) -> object:
        need = EXPORT_NAME_REPLY_SIZE + (0 if self.no_zeroes else EXPORT_NAME_ZEROES)
        data = self._take(need)
        if data is None:
            return NEED_DATA
        size, flags = decode_export_name_reply(data)
        self._infos = _Infos(export=(size, flags))
        self.phase = Phase.DONE
        return Negotiated(self._export_info())

    def _export_info(self) -> ExportInfo:
        infos = self._infos
        if infos.export is None:
            raise ProtocolError("server accepted the export without sending its size "
                                "(NBD_INFO_EXPORT)")
        size, flags = infos.export
        minimum, preferred, maximum = infos.block_sizes or (None, None, None)
        return ExportInfo(
            name=self.export if infos.name is None else infos.name,
            size=size,
            flags=flags,
            block_size_minimum=minimum,
            block_size_preferred=preferred,
            block_size_maximum=maximum,
            description=infos.description,
            structured=self.structured,
            extended=self.extended,
            contexts=dict(self.contexts),
            tls=self.tls,
        )


@dataclass
class _Infos:
    """NBD_REP_INFO replies received for the pending GO/INFO (unknown types dropped)."""

    export: tuple[int, int] | None = None
    name: str | None = None
    description: str | None = None
    block_sizes: tuple[int, int, int] | None = None

    def record(self, info: int, value: Any) -> None:
        if info == Info.EXPORT:
            self.export = value
        elif info == Info.NAME:
            self.name = value
        elif info == Info.DESCRIPTION:
            self.description = value
        elif info == Info.BLOCK_SIZE:
            check_block_sizes(*value)
            self.block_sizes = value
