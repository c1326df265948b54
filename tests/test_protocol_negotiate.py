"""negotiate.py at its edges: error texts, block size limits, abort and leftovers.

test_negotiate.py holds the handshakes; these are the cases a mutation of negotiate.py
(scripts/mutation) showed no test looked at.
"""

from __future__ import annotations

import errno
from unittest import mock

import pytest
from support.errors import raises_message
from test_negotiate import Script, go_ok, greet, reply

from blockdrv.protocol import (
    NEED_DATA,
    ClientNegotiator,
    Goal,
    Negotiated,
    OptionError,
    ProtocolError,
    TLSMode,
    negotiate,
)
from blockdrv.protocol.constants import (
    MAX_BLOCK_SIZE_MINIMUM,
    MAX_LIST_ENTRIES,
    HandshakeFlag,
    Option,
    OptionReply,
)
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.protocol.negotiate import Phase, check_block_sizes, option_error
from blockdrv.protocol.options import (
    decode_info_request,
    decode_option_header,
    encode_export_name_reply,
    encode_rep_meta_context,
    encode_rep_server,
)


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
