"""options.py at its edges: limits, defaults, and the exact error each bad field gets.

The round trips live in test_codec_roundtrip.py; these are the cases a mutation of
options.py (scripts/mutation) showed no test looked at: which field an error names
(export name, description, meta context...), and the boundaries of the caps.
"""

from __future__ import annotations

import struct

import pytest
from support.errors import raises_message

from blockdrv.protocol.constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    MAX_OPTION_REPLY,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    Info,
)
from blockdrv.protocol.errors import InvalidArgumentError, ProtocolError
from blockdrv.protocol.options import (
    decode_export_name_reply,
    decode_greeting,
    decode_info,
    decode_info_request,
    decode_meta_context_request,
    decode_option_header,
    decode_option_reply_header,
    decode_rep_meta_context,
    decode_rep_server,
    decode_string,
    encode_info_request,
    encode_info_string,
    encode_meta_context_request,
    encode_option,
    encode_option_reply,
    encode_rep_meta_context,
    encode_rep_server,
    encode_string,
)

N = "a\0b"  # a string the protocol cannot carry


def L(n: int) -> bytes:  # noqa: N802 (a length field)
    return struct.pack(">I", n)


@pytest.mark.parametrize("call, kind, message", [
    (lambda: encode_string(N),
     InvalidArgumentError, 'string contains a NUL character'),
    (lambda: encode_string('e'*(MAX_STRING+1)),
     InvalidArgumentError, 'string is 4097 bytes, over the limit of 4096'),
    (lambda: encode_info_request(N),
     InvalidArgumentError, 'export name contains a NUL character'),
    (lambda: encode_meta_context_request(N, []),
     InvalidArgumentError, 'export name contains a NUL character'),
    (lambda: encode_meta_context_request('', [N]),
     InvalidArgumentError, 'meta context contains a NUL character'),
    (lambda: encode_rep_server(N),
     InvalidArgumentError, 'export name contains a NUL character'),
    (lambda: encode_rep_server('', N),
     InvalidArgumentError, 'description contains a NUL character'),
    (lambda: encode_rep_meta_context(1, N),
     InvalidArgumentError, 'meta context contains a NUL character'),
    (lambda: encode_info_string(Info.NAME, N),
     InvalidArgumentError, 'name contains a NUL character'),
    (lambda: encode_info_string(Info.DESCRIPTION, N),
     InvalidArgumentError, 'description contains a NUL character'),
    (lambda: decode_string(b'a\0'),
     ProtocolError, 'string contains a NUL character'),
    (lambda: decode_string(b'\xff'),
     ProtocolError, 'string is not valid UTF-8'),
    (lambda: decode_string(bytes(MAX_STRING + 1)),
     ProtocolError, 'string of 4097 bytes is over the limit of 4096'),
    (lambda: decode_info_request(b''),
     ProtocolError, 'export name: truncated length'),
    (lambda: decode_info_request(L(5) + b'ab'),
     ProtocolError, 'export name: length 5 does not fit the message'),
    (lambda: decode_info_request(L(1) + b'a'),
     ProtocolError, 'information request count missing'),
    (lambda: decode_info_request(L(0) + b'\0\x02\0\x01'),
     ProtocolError, '2 information requests do not fit the option data'),
    (lambda: decode_info_request(L(1) + b'\0' + b'\0\0'),
     ProtocolError, 'export name contains a NUL character'),
    (lambda: decode_meta_context_request(L(1) + b"\0" + L(0)),
     ProtocolError, 'export name contains a NUL character'),
    (lambda: decode_export_name_reply(struct.pack(">QH", 1 << 63, 0)),
     ProtocolError, 'export size 9223372036854775808 is not below 2**63'),
    (lambda: decode_meta_context_request(L(0)),
     ProtocolError, 'meta context query count missing'),
    (lambda: decode_meta_context_request(L(0) + L(2) + L(0)),
     ProtocolError, '2 meta context queries do not fit the option data'),
    (lambda: decode_meta_context_request(L(0) + L(1) + L(0) + b'x'),
     ProtocolError, 'trailing bytes after the meta context queries'),
    (lambda: decode_meta_context_request(L(0) + L(1) + L(3) + b'a'),
     ProtocolError, 'meta context query: length 3 does not fit the message'),
    (lambda: decode_meta_context_request(L(0) + L(1) + L(1) + b'\0'),
     ProtocolError, 'meta context query contains a NUL character'),
    (lambda: decode_rep_server(b''),
     ProtocolError, 'export name: truncated length'),
    (lambda: decode_rep_server(L(1) + b'\0'),
     ProtocolError, 'export name contains a NUL character'),
    (lambda: decode_rep_server(L(0) + b'\0'),
     ProtocolError, 'export description contains a NUL character'),
    (lambda: decode_rep_server(L(MAX_STRING + 1) + bytes(MAX_STRING + 1)),
     ProtocolError, 'export name: length 4097 does not fit the message'),
    (lambda: decode_rep_meta_context(b'abc'),
     ProtocolError, 'meta context reply shorter than 4 bytes'),
    (lambda: decode_rep_meta_context(L(1) + b'\0'),
     ProtocolError, 'meta context name contains a NUL character'),
    (lambda: decode_greeting(bytes(18)),
     ProtocolError, 'not an NBD server (greeting magic 0x0000000000000000)'),
    (lambda: decode_greeting(struct.pack('>QQH', NBDMAGIC,
                                     CLISERV_MAGIC, 0)),
     ProtocolError, 'server uses oldstyle negotiation, which is not supported '
     '(only fixed newstyle is)'),
    (lambda: decode_greeting(struct.pack('>QQH', NBDMAGIC, 1, 0)),
     ProtocolError, 'bad newstyle magic 0x0000000000000001'),
    (lambda: decode_option_header(bytes(16)),
     ProtocolError, 'bad option magic 0x0000000000000000'),
    (lambda: decode_option_reply_header(bytes(20)),
     ProtocolError, 'bad option reply magic 0x0000000000000000'),
    (lambda: decode_option_reply_header(
        struct.pack('>QIII', OPTION_REPLY_MAGIC, 1, 1, MAX_OPTION_REPLY + 1)),
     ProtocolError, 'option reply of 8197 bytes is over the limit of 8196'),
    (lambda: decode_info(b'a'),
     ProtocolError, 'information reply shorter than 2 bytes'),
    (lambda: decode_info(struct.pack('>H', Info.EXPORT) + bytes(9)),
     ProtocolError, 'NBD_INFO_EXPORT of 11 bytes, expected 12'),
    (lambda: decode_info(struct.pack('>HQH', Info.EXPORT, 1 << 63, 0)),
     ProtocolError, 'export size 9223372036854775808 is not below 2**63'),
    (lambda: decode_info(struct.pack('>H', Info.BLOCK_SIZE) + bytes(11)),
     ProtocolError, 'NBD_INFO_BLOCK_SIZE of 13 bytes, expected 14'),
    (lambda: decode_info(struct.pack('>H', Info.NAME) + b'\0'),
     ProtocolError, 'name contains a NUL character'),
    (lambda: decode_info(struct.pack('>H', Info.DESCRIPTION) + b'\0'),
     ProtocolError, 'description contains a NUL character'),
])
def test_each_bad_field_is_named(call, kind, message):
    with raises_message(kind, message):
        call()


def test_strings_may_be_as_long_as_the_limit():
    text = "e" * MAX_STRING
    assert encode_string(text) == text.encode()
    assert decode_string(text.encode()) == text
    assert decode_rep_server(L(MAX_STRING) + text.encode()) == (text, "")
    assert decode_rep_server(L(0) + text.encode()) == ("", text)


def test_option_reply_may_be_as_long_as_the_limit():
    header = struct.pack(">QIII", OPTION_REPLY_MAGIC, 3, 1, MAX_OPTION_REPLY)
    assert decode_option_reply_header(header) == (3, 1, MAX_OPTION_REPLY)


def test_export_size_just_below_2_63_is_accepted():
    size = (1 << 63) - 1
    assert decode_info(struct.pack(">HQH", Info.EXPORT, size, 1)) == (Info.EXPORT, (size, 1))


def test_greeting_and_option_header_fields():
    greeting = struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert decode_greeting(greeting) == 3
    assert decode_option_header(encode_option(7)) == (7, 0)
    assert encode_option(7) == struct.pack(">QII", IHAVEOPT, 7, 0)
    assert CLISERV_MAGIC != IHAVEOPT


def test_encoder_defaults_are_empty():
    assert encode_rep_server("x") == L(1) + b"x"
    assert encode_option_reply(1, 2) == struct.pack(">QIII", OPTION_REPLY_MAGIC, 1, 2, 0)
    assert decode_info_request(encode_info_request("x")) == ("x", [])
    assert decode_meta_context_request(encode_meta_context_request("x", [])) == ("x", [])
    assert decode_rep_meta_context(encode_rep_meta_context(5, "m:c")) == (5, "m:c")
    assert decode_info(encode_info_string(Info.NAME, "n")) == (Info.NAME, "n")
