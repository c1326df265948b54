"""The client negotiator: against the server negotiator in memory and scripted servers."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.handshake import converse

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
)
from blockdrv.protocol.constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blockdrv.protocol.options import (
    decode_client_flags,
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
