"""server_negotiate.py byte by byte: every reply the server side queues, and when.

test_negotiate.py runs ServerNegotiator against the client negotiator; these tests feed
it a client's bytes directly and check each reply (option, type, text) and event, the
cases a mutation of server_negotiate.py (scripts/mutation) showed no test looked at.
"""

from __future__ import annotations

import struct

import pytest
from support.errors import raises_message

from blockdrv.protocol import NEED_DATA, ProtocolError, StartTLS, TLSMode
from blockdrv.protocol.constants import (
    MAX_OPTION_REQUEST,
    REQUEST_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)
from blockdrv.protocol.events import ClientAborted, ExportChosen
from blockdrv.protocol.options import (
    OPTION_REPLY_HEADER_SIZE,
    decode_option_reply_header,
    encode_client_flags,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_export,
    encode_info_request,
    encode_info_string,
    encode_meta_context_request,
    encode_option,
    encode_rep_meta_context,
    encode_rep_server,
)
from blockdrv.protocol.server_negotiate import ExportOffer, OptionAnswered, ServerNegotiator

T = TransmissionFlag
DISK = ExportOffer("disk", 1 << 30, T.SEND_FLUSH | T.SEND_FUA, "a test disk",
                   (512, 4096, 1 << 20), ("base:allocation", "qemu:dirty-bitmap:b0"))
BARE = ExportOffer("bare", 4096, T.SEND_DF)  # no description, block sizes
EXPORTS = {"disk": DISK, "bare": BARE}
BOTH = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
Reply = tuple[int, int, bytes]


def opened(flags: int = BOTH, **kw: object) -> ServerNegotiator:
    """A negotiator past the greeting and the client flags."""
    server = ServerNegotiator(EXPORTS, **kw)  # type: ignore[arg-type]
    assert server.data_to_send() == encode_greeting(HandshakeFlag.FIXED_NEWSTYLE
                                                    | HandshakeFlag.NO_ZEROES)
    server.receive_data(encode_client_flags(flags))
    assert server.next_event() is NEED_DATA
    return server


def replies(data: bytes) -> list[Reply]:
    """(option, reply type, payload) of each option reply in ``data``."""
    out = []
    while data:
        option, reply_type, length = decode_option_reply_header(data)
        end = OPTION_REPLY_HEADER_SIZE + length
        out.append((option, reply_type, data[OPTION_REPLY_HEADER_SIZE:end]))
        data = data[end:]
    return out


def ask(server: ServerNegotiator, option: int, data: bytes = b"") -> tuple[object, list[Reply]]:
    """Send one option; the event it gave and the replies it queued."""
    server.receive_data(encode_option(option, data))
    event = server.next_event()
    return event, replies(server.data_to_send())


def refusal(option: int, reply_type: int, text: str) -> list[Reply]:
    return [(option, reply_type, text.encode())]


def ack(option: int) -> Reply:
    return (option, OptionReply.ACK, b"")


def info_export(option: int, offer: ExportOffer, flags: int) -> Reply:
    return (option, OptionReply.INFO, encode_info_export(offer.size, flags))


# --- client flags, counting, pipelining ---------------------------------------------------


def test_a_fresh_negotiator_has_negotiated_nothing():
    server = ServerNegotiator(EXPORTS)
    assert (server.tls, server.no_zeroes, server.structured, server.extended,
            server.contexts, server.options_received, server.last_option,
            server.last_export) == (False, False, False, False, {}, 0, None, None)


def test_client_flags_are_read_once_all_four_bytes_are_in():
    server = ServerNegotiator(EXPORTS)
    server.receive_data(encode_client_flags(BOTH)[:3])
    assert server.next_event() is NEED_DATA
    assert not server.no_zeroes
    server.receive_data(encode_client_flags(BOTH)[3:])
    assert server.next_event() is NEED_DATA
    assert server.no_zeroes


def test_unknown_client_flags_are_a_violation():
    server = ServerNegotiator(EXPORTS)
    server.receive_data(encode_client_flags(0x4 | ClientFlag.FIXED_NEWSTYLE))
    with raises_message(ProtocolError, "client sent unknown flags 0x00000005"):
        server.next_event()


@pytest.mark.parametrize("flags, no_zeroes", [(BOTH, True), (ClientFlag.FIXED_NEWSTYLE, False)])
def test_export_name_reply_has_zeroes_unless_the_client_said_no(flags, no_zeroes):
    server = opened(flags)
    server.receive_data(encode_option(Option.EXPORT_NAME, b"bare"))
    assert server.next_event() == ExportChosen("bare", False, False, {}, int(T.HAS_FLAGS),
                                               False)
    assert server.data_to_send() == encode_export_name_reply(4096, T.HAS_FLAGS,
                                                             no_zeroes=no_zeroes)


def test_more_options_than_allowed_is_a_violation():
    server = opened(max_options=2)
    assert ask(server, Option.LIST)[0] is NEED_DATA
    assert ask(server, Option.LIST)[0] is NEED_DATA
    assert server.options_received == 2
    with raises_message(ProtocolError, "client sent more than 2 options"):
        ask(server, Option.LIST)


def test_pipelined_options_are_answered_in_order():
    server = opened()
    server.receive_data(encode_option(Option.STRUCTURED_REPLY)
                        + encode_option(Option.EXTENDED_HEADERS))
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send()) == [ack(Option.STRUCTURED_REPLY),
                                              ack(Option.EXTENDED_HEADERS)]


def test_step_options_stops_after_each_answer():
    server = opened(step_options=True)
    server.receive_data(encode_option(Option.STRUCTURED_REPLY) + encode_option(Option.LIST))
    assert server.next_event() == OptionAnswered(Option.STRUCTURED_REPLY)
    assert replies(server.data_to_send()) == [ack(Option.STRUCTURED_REPLY)]
    assert server.next_event() == OptionAnswered(Option.LIST)
    assert (server.last_option, server.last_export) == (Option.LIST, None)


def test_oversized_option_data_is_skipped_as_it_streams_in():
    server = opened()
    length = MAX_OPTION_REQUEST + 1
    server.receive_data(encode_option(Option.LIST)[:-4] + struct.pack(">I", length)
                        + bytes(1000))
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send()) == refusal(
        Option.LIST, OptionReply.ERR_TOO_BIG, f"option data of {length} bytes is too large")
    server.receive_data(bytes(length - 1000 - 10))
    assert server.next_event() is NEED_DATA
    server.receive_data(bytes(10) + encode_option(Option.STRUCTURED_REPLY))
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send()) == [ack(Option.STRUCTURED_REPLY)]


def test_option_data_at_the_limit_is_read():
    server = opened()
    _, answer = ask(server, Option.LIST, bytes(MAX_OPTION_REQUEST))
    assert answer == refusal(Option.LIST, OptionReply.ERR_INVALID, "this option takes no data")


@pytest.mark.parametrize("option", [Option.LIST, Option.STARTTLS, Option.STRUCTURED_REPLY,
                                    Option.EXTENDED_HEADERS])
def test_options_without_data_refuse_data(option):
    server = opened(tls=TLSMode.ALLOW)
    assert ask(server, option, b"x")[1] == refusal(option, OptionReply.ERR_INVALID,
                                                   "this option takes no data")


def test_unknown_options_are_unsupported():
    assert ask(opened(), 99)[1] == refusal(99, OptionReply.ERR_UNSUP,
                                           "option 99 is not supported")


def test_error_texts_are_cut_to_4096_bytes():
    _, answer = ask(opened(), Option.INFO, encode_info_request("x" * 4096))
    assert answer == [(Option.INFO, OptionReply.ERR_UNKNOWN,
                       f"no export named {'x' * 4096!r}".encode()[:4096])]


# --- TLS --------------------------------------------------------------------------------


def test_tls_off_refuses_starttls():
    assert ask(opened(), Option.STARTTLS)[1] == refusal(
        Option.STARTTLS, OptionReply.ERR_UNSUP, "TLS is not configured on this server")


def test_tls_required_refuses_other_options_and_export_name_disconnects():
    server = opened(tls=TLSMode.REQUIRE)
    assert ask(server, Option.LIST)[1] == refusal(Option.LIST, OptionReply.ERR_TLS_REQD,
                                                  "this server requires TLS")
    with raises_message(ProtocolError, "client chose an export without TLS, which this "
                                       "server requires"):
        ask(server, Option.EXPORT_NAME, b"disk")


def test_starttls_waits_for_tls_then_starts_over():
    server = opened(tls=TLSMode.ALLOW)
    assert ask(server, Option.STRUCTURED_REPLY)[1] == [ack(Option.STRUCTURED_REPLY)]
    ask(server, Option.SET_META_CONTEXT, encode_meta_context_request("disk",
                                                                     ["base:allocation"]))
    assert server.contexts == {1: "base:allocation"}
    event, answer = ask(server, Option.STARTTLS)
    assert (event, answer) == (StartTLS(), [ack(Option.STARTTLS)])
    server.receive_data(encode_option(Option.LIST))  # not acted on before tls_started()
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b""
    server.tls_started()
    assert (server.tls, server.structured, server.extended, server.contexts) == (
        True, False, False, {})
    assert server.next_event() is NEED_DATA
    assert [r[:2] for r in replies(server.data_to_send())] == [
        (Option.LIST, OptionReply.SERVER)] * 2 + [(Option.LIST, OptionReply.ACK)]
    assert ask(server, Option.STARTTLS)[1] == refusal(Option.STARTTLS,
                                                      OptionReply.ERR_INVALID,
                                                      "TLS is already on")
    event, _ = ask(server, Option.GO, encode_info_request("disk"))
    assert event == ExportChosen("disk", False, False, {}, int(DISK.flags | T.HAS_FLAGS),
                                 False)


def test_tls_started_without_starttls_is_a_caller_bug():
    with pytest.raises(RuntimeError, match=r"^tls_started\(\) without a StartTLS event$"):
        opened(tls=TLSMode.ALLOW).tls_started()


def test_plaintext_behind_starttls_is_a_violation():
    server = opened(tls=TLSMode.ALLOW)
    server.receive_data(encode_option(Option.STARTTLS) + encode_option(Option.LIST))
    with raises_message(ProtocolError, "client sent 16 plaintext bytes after STARTTLS, "
                                       "before the TLS handshake"):
        server.next_event()


# --- structured replies, extended headers ----------------------------------------------


def test_structured_replies_once_and_only_if_offered():
    assert ask(opened(structured=False), Option.STRUCTURED_REPLY)[1] == refusal(
        Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP, "structured replies are disabled")
    server = opened()
    assert ask(server, Option.STRUCTURED_REPLY)[1] == [ack(Option.STRUCTURED_REPLY)]
    assert ask(server, Option.STRUCTURED_REPLY)[1] == refusal(
        Option.STRUCTURED_REPLY, OptionReply.ERR_INVALID, "structured replies are already on")


def test_extended_headers_once_and_only_if_offered():
    assert ask(opened(extended=False), Option.EXTENDED_HEADERS)[1] == refusal(
        Option.EXTENDED_HEADERS, OptionReply.ERR_UNSUP, "extended headers are disabled")
    server = opened()
    assert ask(server, Option.EXTENDED_HEADERS)[1] == [ack(Option.EXTENDED_HEADERS)]
    assert (server.extended, server.structured) == (True, True)
    assert ask(server, Option.EXTENDED_HEADERS)[1] == refusal(
        Option.EXTENDED_HEADERS, OptionReply.ERR_INVALID, "extended headers are already on")
    with raises_message(ProtocolError,
                        "client used NBD_OPT_EXPORT_NAME after extended headers"):
        ask(server, Option.EXPORT_NAME, b"disk")


# --- LIST ------------------------------------------------------------------------------


def test_list_names_every_export_with_its_description():
    assert ask(opened(), Option.LIST)[1] == [
        (Option.LIST, OptionReply.SERVER, encode_rep_server("disk", "a test disk")),
        (Option.LIST, OptionReply.SERVER, encode_rep_server("bare", "")),
        ack(Option.LIST)]


def test_list_can_be_refused():
    assert ask(opened(allow_list=False), Option.LIST)[1] == refusal(
        Option.LIST, OptionReply.ERR_POLICY, "listing exports is disabled")


# --- meta contexts ---------------------------------------------------------------------


def contexts(option: int, queries: list[str], export: str = "disk") -> list[Reply]:
    server = opened()
    ask(server, Option.STRUCTURED_REPLY)
    return ask(server, option, encode_meta_context_request(export, queries))[1]


def meta(option: int, context_id: int, name: str) -> Reply:
    return (option, OptionReply.META_CONTEXT, encode_rep_meta_context(context_id, name))


LIST_META, SET_META = Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT


@pytest.mark.parametrize("option, queries, found", [
    (LIST_META, [], [(0, "base:allocation"), (0, "qemu:dirty-bitmap:b0")]),
    (LIST_META, ["qemu:"], [(0, "qemu:dirty-bitmap:b0")]),
    (LIST_META, ["base:allocation"], [(0, "base:allocation")]),
    (LIST_META, ["base:other"], []),  # not a namespace query: exact names only
    (LIST_META, ["qemu:dirty-bitmap:"], []),  # the namespace ends at the first colon
    (SET_META, [], []),
    (SET_META, ["base:"], []),  # SET takes exact names
    (SET_META, ["qemu:dirty-bitmap:b0", "base:allocation"],
     [(1, "qemu:dirty-bitmap:b0"), (2, "base:allocation")]),
])
def test_meta_context_queries(option, queries, found):
    assert contexts(option, queries) == [meta(option, i, n) for i, n in found] + [ack(option)]


def test_meta_contexts_need_structured_replies():
    answer = ask(opened(), LIST_META, encode_meta_context_request("disk", []))[1]
    assert answer == refusal(LIST_META, OptionReply.ERR_INVALID,
                             "meta contexts need structured replies")


@pytest.mark.parametrize("option, data, text", [
    (LIST_META, b"\0\0\0\0", "meta context query count missing"),
    (Option.INFO, b"\0\0\0\0", "information request count missing"),
    (Option.GO, b"\0\0", "export name: truncated length"),
])
def test_bad_requests_are_refused_with_the_decoders_text(option, data, text):
    server = opened()
    ask(server, Option.STRUCTURED_REPLY)
    assert ask(server, option, data)[1] == refusal(option, OptionReply.ERR_INVALID, text)


def test_contexts_go_with_the_export_they_were_set_for():
    server = opened()
    ask(server, Option.STRUCTURED_REPLY)
    ask(server, SET_META, encode_meta_context_request("disk", ["base:allocation"]))
    event, _ = ask(server, Option.GO, encode_info_request("bare"))
    assert event.contexts == {}
    server = opened()
    ask(server, Option.STRUCTURED_REPLY)
    ask(server, SET_META, encode_meta_context_request("disk", ["base:allocation"]))
    server.receive_data(encode_option(Option.EXPORT_NAME, b"disk"))
    assert server.next_event().contexts == {1: "base:allocation"}


# --- INFO, GO, EXPORT_NAME, ABORT --------------------------------------------------------


def test_info_sends_what_was_asked_and_the_block_sizes_anyway():
    server = opened()
    event, answer = ask(server, Option.INFO, encode_info_request("disk"))
    flags = DISK.flags | T.HAS_FLAGS
    assert event is NEED_DATA
    assert answer == [info_export(Option.INFO, DISK, flags),
                      (Option.INFO, OptionReply.INFO, encode_info_block_size(*DISK.block_sizes)),
                      ack(Option.INFO)]
    assert (server.last_option, server.last_export) == (Option.INFO, "disk")
    _, answer = ask(server, Option.INFO,
                    encode_info_request("disk", [Info.NAME, Info.DESCRIPTION]))
    assert answer[1:3] == [
        (Option.INFO, OptionReply.INFO, encode_info_string(Info.NAME, "disk")),
        (Option.INFO, OptionReply.INFO, encode_info_string(Info.DESCRIPTION, "a test disk"))]
    _, answer = ask(server, Option.INFO, encode_info_request("bare", [Info.DESCRIPTION]))
    assert answer == [info_export(Option.INFO, BARE, T.HAS_FLAGS), ack(Option.INFO)]


def test_flags_the_server_does_not_name_are_passed_on():
    offer = ExportOffer("new", 512, 1 << 14 | T.SEND_DF)
    server = ServerNegotiator({"new": offer})
    server.receive_data(encode_client_flags(BOTH) + encode_option(
        Option.INFO, encode_info_request("new")))
    assert server.next_event() is NEED_DATA
    assert replies(server.data_to_send()[18:])[0] == info_export(Option.INFO, offer,
                                                                 1 << 14 | T.HAS_FLAGS)


def test_send_df_follows_structured_replies():
    server = opened()
    _, answer = ask(server, Option.INFO, encode_info_request("bare"))
    assert answer[0] == info_export(Option.INFO, BARE, T.HAS_FLAGS)
    ask(server, Option.STRUCTURED_REPLY)
    event, answer = ask(server, Option.GO, encode_info_request("disk", [Info.BLOCK_SIZE]))
    flags = int(DISK.flags | T.HAS_FLAGS | T.SEND_DF)
    assert answer[0] == info_export(Option.GO, DISK, flags)
    assert event == ExportChosen("disk", True, False, {}, flags, True)


def test_default_export_only_for_the_empty_name():
    server = opened(default_export="bare")
    event, _ = ask(server, Option.INFO, encode_info_request("disk"))
    assert server.last_export == "disk"
    assert ask(server, Option.INFO, encode_info_request("nope"))[1] == refusal(
        Option.INFO, OptionReply.ERR_UNKNOWN, "no export named 'nope'")
    event, _ = ask(server, Option.GO, encode_info_request(""))
    assert event == ExportChosen("bare", False, False, {}, int(T.HAS_FLAGS), False)
    assert server.last_export == "bare"


def test_export_name_that_cannot_be_served_disconnects():
    with raises_message(ProtocolError,
                        "cannot serve NBD_OPT_EXPORT_NAME: no export named 'nope'"):
        ask(opened(), Option.EXPORT_NAME, b"nope")
    with pytest.raises(ProtocolError) as excinfo:
        ask(opened(), Option.EXPORT_NAME, b"\xff")
    assert excinfo.value.strerror == ("cannot serve NBD_OPT_EXPORT_NAME: export name is "
                                      "not valid UTF-8")  # not "... [Errno 71] export..."


def test_export_name_answers_with_size_and_flags():
    server = opened(ClientFlag.FIXED_NEWSTYLE)
    ask(server, Option.STRUCTURED_REPLY)
    server.receive_data(encode_option(Option.EXPORT_NAME, b"disk"))
    flags = int(DISK.flags | T.HAS_FLAGS | T.SEND_DF)
    assert server.next_event() == ExportChosen("disk", True, False, {}, flags, False)
    assert server.data_to_send() == encode_export_name_reply(DISK.size, flags,
                                                             no_zeroes=False)


@pytest.mark.parametrize("option, data", [
    (Option.GO, encode_info_request("disk")),
    (Option.EXPORT_NAME, b"disk"),
    (Option.ABORT, b""),
])
def test_after_the_last_option_the_rest_is_left_over(option, data):
    server = opened()
    request = struct.pack(">I", REQUEST_MAGIC) + bytes(24)  # a transmission request
    server.receive_data(encode_option(option, data) + request)
    event = server.next_event()
    assert isinstance(event, ClientAborted if option == Option.ABORT else ExportChosen)
    server.receive_data(b"more")
    assert server.next_event() is NEED_DATA
    assert server.leftover() == request + b"more"
    assert server.leftover() == b""
