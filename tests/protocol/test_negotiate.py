"""The client negotiator: against the server negotiator in memory and scripted servers."""

from __future__ import annotations

import errno
import struct
import tracemalloc
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.errors import raises_message
from support.handshake import converse
from support.mutate import mutate, mutations

from blockdrv.protocol import (
    NEED_DATA,
    ClientNegotiator,
    ExportsListed,
    Goal,
    Negotiated,
    OptionError,
    ProtocolError,
    StartTLS,
    TLSMode,
    negotiate,
)
from blockdrv.protocol.constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    MAX_BLOCK_SIZE_MINIMUM,
    MAX_LIST_ENTRIES,
    NBDMAGIC,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.protocol.negotiate import Phase, check_block_sizes, option_error
from blockdrv.protocol.options import (
    decode_client_flags,
    decode_info_request,
    decode_option_header,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_export,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
)
from blockdrv.protocol.server_negotiate import ExportOffer, ServerNegotiator

FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
         | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)
DISK = ExportOffer("disk", 1 << 30, FLAGS, "a test disk", (512, 4096, 1 << 25))


def server(**kw) -> ServerNegotiator:
    return ServerNegotiator({"disk": DISK}, **kw)


# --- against the server negotiator -------------------------------------------------------


def test_full_negotiation_with_extended_headers():
    client = ClientNegotiator("disk")
    event, chosen = converse(client, server())
    assert isinstance(event, Negotiated)
    info = event.info
    assert (info.name, info.size, info.description) == ("disk", 1 << 30, "a test disk")
    assert info.extended and info.structured
    assert info.contexts == {"base:allocation": 1}
    assert info.can_df  # the server adds SEND_DF once structured replies are on
    assert (info.block_size_minimum, info.block_size_preferred,
            info.block_size_maximum) == (512, 4096, 1 << 25)
    assert chosen.extended and chosen.contexts == {1: "base:allocation"}


def test_server_without_extended_headers_gives_structured_replies():
    event, chosen = converse(ClientNegotiator("disk"), server(extended=False))
    assert event.info.structured and not event.info.extended
    assert event.info.contexts == {"base:allocation": 1}


def test_server_without_structured_replies():
    event, chosen = converse(ClientNegotiator("disk"), server(structured=False))
    info = event.info
    assert not info.structured and not info.extended and not info.contexts
    assert not info.can_df and not info.can_block_status


def test_client_can_decline_extended_and_structured():
    event, _ = converse(ClientNegotiator("disk", extended=False, structured=False), server())
    assert not event.info.structured and not event.info.extended


def test_only_offered_meta_contexts_are_selected():
    client = ClientNegotiator("disk", meta_contexts=("base:allocation",
                                                     "qemu:dirty-bitmap:b0"))
    event, _ = converse(client, server())
    assert event.info.contexts == {"base:allocation": 1}


def test_default_export_name():
    event, _ = converse(ClientNegotiator(""),
                        ServerNegotiator({"disk": DISK}, default_export="disk"))
    assert event.info.name == "disk"


def test_unknown_export_is_an_option_error_with_the_servers_message():
    client = ClientNegotiator("nope")
    with pytest.raises(OptionError) as excinfo:
        converse(client, server())
    err = excinfo.value
    assert err.errno == errno.ENOENT
    assert err.option == Option.GO and err.reply_type == OptionReply.ERR_UNKNOWN
    assert "no export named 'nope'" in err.server_message
    assert "nope" in str(err)
    # A soft disconnect is queued, as the spec asks.
    assert decode_option_header(client.data_to_send())[0] == Option.ABORT


def test_list_goal():
    event, _ = converse(ClientNegotiator(goal=Goal.LIST),
                        ServerNegotiator({"a": DISK, "b": DISK}))
    assert isinstance(event, ExportsListed)
    assert [e.name for e in event.exports] == ["disk", "disk"]


def test_info_goal_does_not_enter_transmission():
    client = ClientNegotiator("disk", goal=Goal.INFO)
    event, server_event = converse(client, server())
    assert event.info.size == DISK.size
    assert type(server_event).__name__ == "ClientAborted"


def test_list_meta_context_goal():
    event, _ = converse(ClientNegotiator("disk", goal=Goal.LIST_META_CONTEXT,
                                         meta_contexts=("base:",)), server())
    assert event.contexts == ["base:allocation"]


# --- TLS decisions ----------------------------------------------------------------------


def test_tls_require_against_server_without_tls_fails_without_plaintext():
    client = ClientNegotiator("disk", tls=TLSMode.REQUIRE)
    with pytest.raises(OptionError) as excinfo:
        converse(client, server(tls=TLSMode.OFF))
    assert "TLS is required" in str(excinfo.value)
    # Nothing but the soft disconnect follows: no GO in plaintext.
    assert decode_option_header(client.data_to_send())[0] == Option.ABORT
    assert Option.GO not in client._tried


def test_tls_allow_falls_back_to_plaintext():
    event, _ = converse(ClientNegotiator("disk", tls=TLSMode.ALLOW), server(tls=TLSMode.OFF))
    assert not event.info.tls


@pytest.mark.parametrize("client_tls", [TLSMode.ALLOW, TLSMode.REQUIRE])
def test_tls_upgrade_then_negotiation_continues(client_tls):
    client = ClientNegotiator("disk", tls=client_tls)
    srv = server(tls=TLSMode.REQUIRE)
    event, chosen = converse(client, srv)
    assert event.info.tls and event.info.extended and srv.tls


def test_client_without_tls_against_forced_tls_server():
    with pytest.raises(OptionError) as excinfo:
        converse(ClientNegotiator("disk"), server(tls=TLSMode.REQUIRE))
    assert excinfo.value.reply_type == OptionReply.ERR_TLS_REQD
    assert "requires TLS" in str(excinfo.value)


def test_plaintext_after_starttls_ack_is_a_protocol_error():
    client = ClientNegotiator("disk", tls=TLSMode.REQUIRE)
    client.receive_data(encode_greeting(HandshakeFlag.FIXED_NEWSTYLE))
    assert client.next_event() is NEED_DATA
    client.receive_data(encode_option_reply(Option.STARTTLS, OptionReply.ACK) + b"injected")
    with pytest.raises(ProtocolError, match="plaintext bytes after"):
        client.next_event()


def test_starttls_ack_alone_asks_for_the_upgrade():
    client = ClientNegotiator("disk", tls=TLSMode.REQUIRE)
    client.receive_data(encode_greeting(HandshakeFlag.FIXED_NEWSTYLE))
    client.next_event()
    client.receive_data(encode_option_reply(Option.STARTTLS, OptionReply.ACK))
    assert isinstance(client.next_event(), StartTLS)
    assert client.next_event() is NEED_DATA  # waits for tls_started()


# --- scripted servers: paths the embedded server never takes ----------------------------


class Script:
    """A client negotiator fed a hand-written server transcript."""

    def __init__(self, **kw):
        self.client = ClientNegotiator("disk", **kw)
        self.sent: list[int] = []

    def feed(self, data: bytes):
        self.client.receive_data(data)
        event = self.client.next_event()
        out = self.client.data_to_send()
        while len(out) >= 16:
            if out[:8] == struct.pack(">Q", IHAVEOPT):
                option, length = decode_option_header(out)
                self.sent.append(option)
                out = out[16 + length:]
            else:
                out = out[4:]  # client flags
        return event


def greet(flags=HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return encode_greeting(flags)


def reply(option, type_=OptionReply.ACK, data=b""):
    return encode_option_reply(option, type_, data)


def go_ok(option=Option.GO, size=4096, flags=FLAGS):
    return reply(option, OptionReply.INFO, encode_info_export(size, flags)) + reply(option)


def test_fallback_to_export_name_when_go_is_unsupported():
    for no_zeroes in (True, False):
        s = Script(extended=False)
        flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
        assert s.feed(greet(flags)) is NEED_DATA
        assert s.feed(reply(Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP)) is NEED_DATA
        assert s.feed(reply(Option.GO, OptionReply.ERR_UNSUP)) is NEED_DATA
        assert s.sent[-1] == Option.EXPORT_NAME
        event = s.feed(encode_export_name_reply(8192, FLAGS, no_zeroes=no_zeroes))
        assert isinstance(event, Negotiated)
        assert event.info.size == 8192 and not event.info.structured


def test_no_export_name_fallback_after_extended_headers():
    s = Script()
    s.feed(greet())
    s.feed(reply(Option.EXTENDED_HEADERS))
    s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                 encode_rep_meta_context(7, "base:allocation")) + reply(Option.SET_META_CONTEXT))
    with pytest.raises(OptionError):
        s.feed(reply(Option.GO, OptionReply.ERR_UNSUP))
    assert Option.EXPORT_NAME not in s.sent


def test_client_flags_answer_the_greeting():
    client = ClientNegotiator()
    client.receive_data(greet(HandshakeFlag.FIXED_NEWSTYLE))
    client.next_event()
    assert decode_client_flags(client.data_to_send()) == 1  # no NO_ZEROES unless offered
    client = ClientNegotiator()
    client.receive_data(greet())
    client.next_event()
    assert decode_client_flags(client.data_to_send()) == 3


def test_oldstyle_is_refused():
    client = ClientNegotiator()
    client.receive_data(struct.pack(">QQ", NBDMAGIC, CLISERV_MAGIC) + b"\0" * 2)
    with pytest.raises(ProtocolError, match="oldstyle"):
        client.next_event()


def test_non_fixed_newstyle_is_refused():
    client = ClientNegotiator()
    client.receive_data(encode_greeting(0))
    with pytest.raises(ProtocolError, match="fixed newstyle"):
        client.next_event()


def test_not_an_nbd_server():
    client = ClientNegotiator()
    client.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ProtocolError, match="not an NBD server"):
        client.next_event()


def test_unknown_info_types_and_transmission_flags_are_ignored():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    event = s.feed(reply(Option.GO, OptionReply.INFO, struct.pack(">H", 77) + b"future")
                   + reply(Option.GO, OptionReply.INFO, encode_info_export(4096, 0x8000 | 1))
                   + reply(Option.GO))
    assert event.info.flags == 0x8001 and not event.info.can_flush


@pytest.mark.parametrize("sizes", [(3, 4096, 1 << 20), (512, 256, 1 << 20),
                                   (1 << 17, 1 << 17, 1 << 20), (512, 4096, 1000)])
def test_bad_block_sizes_are_refused(sizes):
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(ProtocolError, match="block size"):
        s.feed(reply(Option.GO, OptionReply.INFO, encode_info_block_size(*sizes)))


def test_ack_without_export_info_is_refused():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(ProtocolError, match="NBD_INFO_EXPORT"):
        s.feed(reply(Option.GO))


def test_reply_to_the_wrong_option_is_refused():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(ProtocolError, match="while NBD_OPT_GO was pending"):
        s.feed(reply(Option.LIST))


def test_ack_with_payload_is_refused():
    s = Script(extended=False)
    s.feed(greet())
    with pytest.raises(ProtocolError, match="carries"):
        s.feed(reply(Option.STRUCTURED_REPLY, OptionReply.ACK, b"x"))


def test_oversized_option_reply_is_refused_before_reading_it():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    header = struct.pack(">QIII", 0x3E889045565A9, Option.GO, OptionReply.INFO, 0xFFFFFFF0)
    with pytest.raises(ProtocolError, match="over the limit"):
        s.feed(header)


def test_export_size_must_stay_below_2_63():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(ProtocolError, match="2\\*\\*63"):
        s.feed(go_ok(size=1 << 63))


def test_optional_features_refused_means_going_on_without_them():
    s = Script()
    s.feed(greet())
    s.feed(reply(Option.EXTENDED_HEADERS, OptionReply.ERR_POLICY, b"no"))
    s.feed(reply(Option.STRUCTURED_REPLY))
    s.feed(reply(Option.SET_META_CONTEXT, OptionReply.ERR_INVALID))
    event = s.feed(go_ok())
    assert event.info.structured and not event.info.extended and not event.info.contexts
    assert s.sent == [Option.EXTENDED_HEADERS, Option.STRUCTURED_REPLY,
                      Option.SET_META_CONTEXT, Option.GO]


def test_shutdown_refusal_is_fatal_anywhere():
    s = Script()
    s.feed(greet())
    with pytest.raises(OptionError) as excinfo:
        s.feed(reply(Option.EXTENDED_HEADERS, OptionReply.ERR_SHUTDOWN))
    assert excinfo.value.errno == errno.ESHUTDOWN


def test_unknown_option_error_type_is_still_an_error():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(OptionError) as excinfo:
        s.feed(reply(Option.GO, 0x80000077, b"new kind of no"))
    assert excinfo.value.server_message == "new kind of no"


def test_duplicate_meta_context_id_is_refused():
    s = Script()
    s.feed(greet())
    s.feed(reply(Option.EXTENDED_HEADERS))
    ctx = encode_rep_meta_context(1, "base:allocation")
    with pytest.raises(ProtocolError, match="twice"):
        s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT, ctx) * 2)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError):
        ClientNegotiator("x" * 5000)
    with pytest.raises(ValueError):
        ClientNegotiator("a\0b")


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=20), extended=st.booleans(),
       tls=st.sampled_from(list(TLSMode)))
def test_any_chunking_gives_the_same_result(sizes, extended, tls):
    def split(data: bytes) -> list[bytes]:
        pieces, i, k = [], 0, 0
        while i < len(data):
            n = sizes[k % len(sizes)]
            pieces.append(data[i:i + n])
            i, k = i + n, k + 1
        return pieces

    client = ClientNegotiator("disk", extended=extended, tls=tls)
    srv = server(tls=TLSMode.ALLOW)
    event, chosen = converse(client, srv, split)
    assert event.info.size == DISK.size
    assert event.info.extended is extended
    assert event.info.tls is (tls is not TLSMode.OFF)
    assert chosen.contexts == {1: "base:allocation"}


def test_info_replies_may_come_in_any_order():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    event = s.feed(reply(Option.GO, OptionReply.INFO, encode_info_block_size(512, 4096, 65536))
                   + reply(Option.GO, OptionReply.INFO,
                           struct.pack(">H", Info.NAME) + b"canonical")
                   + go_ok())
    assert event.info.name == "canonical" and event.info.max_payload == 65536


# --- what a server can make the negotiator hold is bounded ----------------------------


def test_info_replies_past_the_cap_are_a_violation():
    from blockdrv.protocol.constants import MAX_INFO_REPLIES
    s = Script(extended=False, structured=False)
    s.feed(greet())
    name = reply(Option.GO, OptionReply.INFO, struct.pack(">H", Info.NAME) + b"n")
    assert s.feed(name * MAX_INFO_REPLIES) is NEED_DATA
    with pytest.raises(ProtocolError, match="MAX_INFO_REPLIES"):
        s.feed(name)


@pytest.mark.parametrize("goal, option, make", [
    (Goal.LIST, Option.LIST, lambda i: encode_rep_server(f"export-{i}")),
    (Goal.LIST_META_CONTEXT, Option.LIST_META_CONTEXT,
     lambda i: encode_rep_meta_context(i, f"x:{i}")),
])
def test_list_answers_past_the_cap_are_a_violation(goal, option, make):
    from blockdrv.protocol.constants import MAX_LIST_ENTRIES
    s = Script(extended=False, structured=False, goal=goal)
    s.feed(greet())
    entry_type = OptionReply.SERVER if option == Option.LIST else OptionReply.META_CONTEXT
    batch = 4096
    for start in range(0, MAX_LIST_ENTRIES, batch):
        s.feed(b"".join(reply(option, entry_type, make(i)) for i in range(start, start + batch)))
    with pytest.raises(ProtocolError, match="MAX_LIST_ENTRIES"):
        s.feed(reply(option, entry_type, make(MAX_LIST_ENTRIES)))


def test_list_answers_past_the_byte_cap_are_a_violation():
    from blockdrv.protocol.constants import MAX_LIST_BYTES
    s = Script(extended=False, structured=False, goal=Goal.LIST)
    s.feed(greet())
    entry = reply(Option.LIST, OptionReply.SERVER, encode_rep_server("e" * 4000, "d" * 4000))
    with pytest.raises(ProtocolError, match="MAX_LIST_BYTES"):
        for _ in range(MAX_LIST_BYTES // len(entry) + 1):
            s.feed(entry)


def test_a_context_not_asked_for_is_refused():
    s = Script(meta_contexts=("base:allocation",))
    s.feed(greet())
    s.feed(reply(Option.EXTENDED_HEADERS))
    with pytest.raises(ProtocolError, match="'qemu:evil', which was not asked for"):
        s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                     encode_rep_meta_context(9, "qemu:evil")))


def test_a_listed_context_is_kept_once():
    s = Script(extended=False, goal=Goal.LIST_META_CONTEXT)
    s.feed(greet())
    s.feed(reply(Option.STRUCTURED_REPLY))
    entry = reply(Option.LIST_META_CONTEXT, OptionReply.META_CONTEXT,
                  encode_rep_meta_context(1, "base:allocation"))
    event = s.feed(entry * 3 + reply(Option.LIST_META_CONTEXT))
    assert event.contexts == ["base:allocation"]


# --- test_protocol_negotiate ---

@pytest.mark.parametrize("option, reply_type, message, export, text, code", [
    (Option.GO, OptionReply.ERR_UNKNOWN, "", "disk",
     "NBD_OPT_GO for export 'disk': no such export", errno.ENOENT),
    (Option.INFO, OptionReply.ERR_POLICY, "go away", "disk",
     "NBD_OPT_INFO for export 'disk': refused by server policy (server said: go away)",
     errno.EPERM),
    (Option.EXPORT_NAME, OptionReply.ERR_UNSUP, "", "d",
     "NBD_OPT_EXPORT_NAME for export 'd': not supported by the server", errno.ENOTSUP),
    (Option.GO, OptionReply.ERR_UNKNOWN, "", "",
     "NBD_OPT_GO: no such export", errno.ENOENT),
    (Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID, "", "disk",
     "NBD_OPT_STRUCTURED_REPLY: rejected as invalid", errno.EINVAL),
    (Option.GO, 0x80000077, "", "", "NBD_OPT_GO: error 0x80000077", errno.EIO),
    (99, OptionReply.ERR_TOO_BIG, "", "", "NBD_OPT_99: request or reply too large",
     errno.E2BIG),
])
def test_option_errors_say_option_export_reason_and_message(option, reply_type, message,
                                                            export, text, code):
    error = option_error(option, reply_type, message, export)
    assert isinstance(error, OptionError)
    assert (error.strerror, error.errno) == (text, code)
    assert (error.option, error.reply_type, error.server_message) == (option, reply_type,
                                                                        message)
    if not export:
        assert option_error(option, reply_type, message).strerror == text


@pytest.mark.parametrize("sizes", [
    (1, 512, 0xFFFFFFFF), (512, 512, 512), (MAX_BLOCK_SIZE_MINIMUM, MAX_BLOCK_SIZE_MINIMUM,
                                              MAX_BLOCK_SIZE_MINIMUM),
    (2, 1024, 4), (1, 512, 1),
])
def test_block_sizes_at_the_limits_are_accepted(sizes):
    check_block_sizes(*sizes)


@pytest.mark.parametrize("sizes, message", [
    ((0, 512, 4096), "server minimum block size 0 is not a power of two up to "
                     f"{MAX_BLOCK_SIZE_MINIMUM}"),
    ((3, 512, 4096), "server minimum block size 3 is not a power of two up to "
                     f"{MAX_BLOCK_SIZE_MINIMUM}"),
    ((2 * MAX_BLOCK_SIZE_MINIMUM, 2 * MAX_BLOCK_SIZE_MINIMUM, 1 << 30),
     f"server minimum block size {2 * MAX_BLOCK_SIZE_MINIMUM} is not a power of two up to "
     f"{MAX_BLOCK_SIZE_MINIMUM}"),
    ((1, 256, 4096), "server preferred block size 256 is not a power of two of at least "
                     "max(minimum, 512)"),
    ((1, 768, 4096), "server preferred block size 768 is not a power of two of at least "
                     "max(minimum, 512)"),
    ((1024, 512, 4096), "server preferred block size 512 is not a power of two of at least "
                        "max(minimum, 512)"),
    ((4, 512, 2), "server maximum block size 2 is not a multiple of the minimum 4"),
    ((4, 512, 6), "server maximum block size 6 is not a multiple of the minimum 4"),
    ((4, 512, 0xFFFFFFFE), "server maximum block size 4294967294 is not a multiple of the "
                           "minimum 4"),
])
def test_block_sizes_breaking_the_spec_are_named(sizes, message):
    with raises_message(ProtocolError, message):
        check_block_sizes(*sizes)


def test_a_bad_export_or_context_name_is_refused_up_front():
    with raises_message(InvalidArgumentError, "export name contains a NUL character"):
        ClientNegotiator("a\0b")
    with raises_message(InvalidArgumentError, "meta context contains a NUL character"):
        ClientNegotiator("disk", meta_contexts=["a\0b"])


def test_a_failed_handshake_stays_failed():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(OptionError):
        s.feed(reply(Option.GO, OptionReply.ERR_UNKNOWN))
    with raises_message(ProtocolError, "the handshake already failed"):
        s.client.next_event()


def test_tls_started_without_starttls_is_a_caller_bug():
    with pytest.raises(RuntimeError, match="^tls_started\\(\\) without a StartTLS event$"):
        ClientNegotiator("disk").tls_started()


def test_abort_only_while_haggling_over_options():
    client = ClientNegotiator("disk")
    assert client.abort() == b""  # no greeting yet: nothing to abort
    client.receive_data(greet())
    assert client.next_event() is NEED_DATA
    client.data_to_send()
    assert decode_option_header(client.abort()) == (Option.ABORT, 0)
    assert decode_option_header(client.abort()) == (Option.ABORT, 0)  # failed: still
    done = Script(extended=False, structured=False)
    done.feed(greet())
    done.feed(go_ok())
    assert done.client.abort() == b""  # in transmission: NBD_CMD_DISC, not an option


def test_leftover_hands_over_the_bytes_after_the_handshake_once():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    s.feed(go_ok() + b"transmission")
    assert s.client.leftover() == b"transmission"
    assert s.client.leftover() == b""


def _fallen_back(no_zeroes: bool) -> ClientNegotiator:
    """A client that fell back to NBD_OPT_EXPORT_NAME; returns it with what it sent."""
    client = ClientNegotiator("disk", extended=False, structured=False)
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    client.receive_data(greet(flags))
    assert client.next_event() is NEED_DATA
    client.data_to_send()
    client.receive_data(reply(Option.GO, OptionReply.ERR_UNSUP))
    assert client.next_event() is NEED_DATA
    return client


def test_export_name_fallback_sends_the_name_and_waits_for_the_zeroes():
    client = _fallen_back(no_zeroes=False)
    sent = client.data_to_send()
    assert decode_option_header(sent) == (Option.EXPORT_NAME, 4) and sent[16:] == b"disk"
    reply_bytes = encode_export_name_reply(8192, 1, no_zeroes=False)
    client.receive_data(reply_bytes[:10])
    assert client.next_event() is NEED_DATA  # the 124 zeroes still to come
    client.receive_data(reply_bytes[10:])
    assert isinstance(client.next_event(), Negotiated)
    assert client.phase is Phase.DONE and client.leftover() == b""


def test_a_refused_export_is_named_in_the_error():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with raises_message(OptionError, "NBD_OPT_GO for export 'disk': no such export"):
        s.feed(reply(Option.GO, OptionReply.ERR_UNKNOWN))


def test_a_refused_starttls_when_required_says_so():
    client = ClientNegotiator("disk", tls=TLSMode.REQUIRE)
    client.receive_data(greet())
    client.next_event()
    client.receive_data(reply(Option.STARTTLS, OptionReply.ERR_POLICY, b"no"))
    with pytest.raises(OptionError) as caught:
        client.next_event()
    error = caught.value
    assert error.strerror == ("TLS is required but the server refused STARTTLS: "
                              "NBD_OPT_STARTTLS: refused by server policy (server said: no)")
    assert (error.errno, error.option, error.reply_type, error.server_message) == (
        errno.EPERM, Option.STARTTLS, OptionReply.ERR_POLICY, "no")


def test_listed_exports_keep_their_descriptions_and_the_query_ends():
    s = Script(extended=False, structured=False, goal=Goal.LIST)
    s.feed(greet())
    event = s.feed(reply(Option.LIST, OptionReply.SERVER, encode_rep_server("a", "first"))
                   + reply(Option.LIST))
    assert [(e.name, e.description) for e in event.exports] == [("a", "first")]
    assert s.client.phase is Phase.DONE


def test_a_context_id_given_twice_is_a_violation():
    s = Script(extended=False, meta_contexts=("base:allocation", "qemu:dirty-bitmap:b"))
    s.feed(greet())
    s.feed(reply(Option.STRUCTURED_REPLY))
    s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                 encode_rep_meta_context(1, "base:allocation")))
    with pytest.raises(ProtocolError):
        s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                     encode_rep_meta_context(1, "qemu:dirty-bitmap:b")))


def test_after_go_the_phase_is_done():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    assert isinstance(s.feed(go_ok()), Negotiated)
    assert s.client.phase is Phase.DONE


def test_an_unlimited_maximum_block_size_needs_no_multiple():
    check_block_sizes(512, 4096, 0xFFFFFFFF)  # "no limit", not a multiple of 512


def test_an_export_without_a_name_info_keeps_the_name_asked_for():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    assert s.feed(go_ok()).info.name == "disk"


def test_an_export_without_its_size_is_a_violation():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with raises_message(ProtocolError, "server accepted the export without sending its size "
                                       "(NBD_INFO_EXPORT)"):
        s.feed(reply(Option.GO))


def test_plaintext_after_the_starttls_ack_is_counted():
    client = ClientNegotiator("disk", tls=TLSMode.REQUIRE)
    client.receive_data(greet())
    client.next_event()
    client.receive_data(reply(Option.STARTTLS) + b"evil")
    with raises_message(ProtocolError,
                        "server sent 4 plaintext bytes after acknowledging STARTTLS"):
        client.next_event()


def test_the_default_export_is_the_empty_name():
    client = ClientNegotiator(extended=False, structured=False)
    client.receive_data(greet())
    client.next_event()
    sent = client.data_to_send()[4:]  # after the client flags
    assert decode_option_header(sent)[0] == Option.GO
    assert decode_info_request(sent[16:])[0] == ""


def test_a_server_without_fixed_newstyle_is_named():
    client = ClientNegotiator("disk")
    client.receive_data(greet(HandshakeFlag.NO_ZEROES))
    with raises_message(ProtocolError, "server does not support fixed newstyle negotiation"):
        client.next_event()


@pytest.mark.parametrize("answer, text", [
    (reply(Option.LIST), "server replied to option LIST while NBD_OPT_GO was pending"),
    (reply(99), "server replied to option 99 while NBD_OPT_GO was pending"),
    (reply(Option.GO, OptionReply.SERVER, encode_rep_server("a")),
     "unexpected reply SERVER to NBD_OPT_GO"),
    (reply(Option.GO, 77), "unexpected reply 77 to NBD_OPT_GO"),
])
def test_replies_out_of_place_are_named(answer, text):
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with raises_message(ProtocolError, text):
        s.feed(answer)


def test_a_context_not_asked_for_names_the_ones_asked():
    s = Script(extended=False, meta_contexts=("base:allocation", "qemu:dirty-bitmap:b"))
    s.feed(greet())
    s.feed(reply(Option.STRUCTURED_REPLY))
    with raises_message(ProtocolError, "server selected meta context 'x:y', which was not "
                                       "asked for (asked: base:allocation, "
                                       "qemu:dirty-bitmap:b)"):
        s.feed(reply(Option.SET_META_CONTEXT, OptionReply.META_CONTEXT,
                     encode_rep_meta_context(1, "x:y")))


def test_the_servers_error_text_is_decoded_leniently_and_cut():
    s = Script(extended=False, structured=False)
    s.feed(greet())
    with pytest.raises(OptionError) as caught:
        s.feed(reply(Option.GO, OptionReply.ERR_POLICY, b"\xff" + b"a" * 5000))
    assert caught.value.server_message == "\ufffd" + "a" * 4095


def test_list_bytes_are_capped_after_the_limit_not_at_it():
    entry = reply(Option.LIST, OptionReply.SERVER, encode_rep_server("abcdef"))  # 30 bytes
    s = Script(extended=False, structured=False, goal=Goal.LIST)
    s.feed(greet())
    with mock.patch.object(negotiate, "MAX_LIST_BYTES", 2 * len(entry)):
        assert s.feed(entry + entry) is NEED_DATA
        with raises_message(ProtocolError, "server's answer to NBD_OPT_LIST is longer than "
                                           f"{MAX_LIST_ENTRIES} entries or 60 bytes "
                                           "(MAX_LIST_ENTRIES, MAX_LIST_BYTES)"):
            s.feed(entry)


# --- test_negotiate_fuzz ---

configs = st.fixed_dictionaries({
    "extended": st.booleans(), "structured": st.booleans(),
    "tls": st.sampled_from(list(TLSMode)),
})


def transcript(config) -> bytes:
    """Everything a server says in a successful handshake with this client config."""
    client = ClientNegotiator("disk", **config)
    server = ServerNegotiator({"disk": DISK}, tls=TLSMode.ALLOW)
    said = bytearray()
    for _ in range(100):
        out = server.data_to_send()
        said += out
        client.receive_data(out)
        event = client.next_event()
        server.receive_data(client.data_to_send())
        if isinstance(server.next_event(), StartTLS):
            server.tls_started()
        if isinstance(event, StartTLS):
            client.tls_started()
        elif event is not NEED_DATA:
            return bytes(said)
    raise AssertionError("no handshake")


def drive(client: ClientNegotiator, data: bytes, chunk: int) -> None:
    """Feed ``data`` in ``chunk``-byte pieces until the handshake ends, raises or runs out."""
    for i in range(0, len(data), chunk):
        client.receive_data(data[i:i + chunk])
        while True:
            event = client.next_event()
            client.data_to_send()
            if isinstance(event, StartTLS):
                client.tls_started()
                continue
            break
        if event is not NEED_DATA:
            return


def peak_memory(client: ClientNegotiator, data: bytes, chunk: int) -> int:
    """The most memory the negotiator held while fed ``data``, however the handshake ended."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            drive(client, data, chunk)
        except (ProtocolError, OptionError):
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def feed(config, data: bytes, chunk: int) -> None:
    # Checked on every path: the handshake completing, raising, or running out of input.
    peak = peak_memory(ClientNegotiator("disk", **config), data, chunk)
    assert peak < 128 * 1024 + 4 * len(data)


# Small caps so that a flood far past them is quick to build; what is checked is that the
# negotiator holds no more than the caps allow however many entries the server sends, and
# whether the flood ends in the cap's ProtocolError, a completed list, or runs out.
FLOOD_ENTRIES, FLOOD_BYTES, FLOOD_LENGTH = 32, 4096, 4000
FLOOD_BOUND = 64 * 1024


@pytest.mark.parametrize("acked", [False, True], ids=["runs-out", "acked"])
@pytest.mark.parametrize("name_size", [0, 60])
@pytest.mark.parametrize("goal", [Goal.LIST, Goal.LIST_META_CONTEXT])
def test_list_floods_stay_within_the_caps(goal, name_size, acked):
    option = Option.LIST if goal is Goal.LIST else Option.LIST_META_CONTEXT

    def entry(i: int) -> bytes:  # distinct names: a set of contexts must not absorb them
        name = f"x:{i:05d}" + "c" * name_size
        if goal is Goal.LIST:
            return reply(option, OptionReply.SERVER, encode_rep_server(name))
        return reply(option, OptionReply.META_CONTEXT, encode_rep_meta_context(i, name))

    data = (greet() + b"".join(entry(i) for i in range(FLOOD_LENGTH))
            + (reply(option) if acked else b""))
    with mock.patch.object(negotiate, "MAX_LIST_ENTRIES", FLOOD_ENTRIES), \
            mock.patch.object(negotiate, "MAX_LIST_BYTES", FLOOD_BYTES):
        client = ClientNegotiator("disk", goal=goal, structured=False, extended=False)
        assert peak_memory(client, data, 4096) < FLOOD_BOUND


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, data=st.binary(max_size=400), chunk=st.integers(1, 50))
def test_arbitrary_bytes(config, data, chunk):
    feed(config, data, chunk)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, chunk=st.integers(1, 50), changes=mutations)
def test_mutated_transcripts(config, chunk, changes):
    feed(config, mutate(transcript(config), changes), chunk)


def test_transcript_is_accepted_unmutated():
    # (With TLS the transcript cannot be fed in one piece: bytes after the STARTTLS
    # acknowledgement would arrive as plaintext, which the client rightly refuses.)
    for extended in (False, True):
        config = {"extended": extended, "structured": True, "tls": TLSMode.OFF}
        client = ClientNegotiator("disk", **config)
        client.receive_data(transcript(config))
        event = client.next_event()
        assert event.info.size == DISK.size and event.info.extended is extended
