"""wire.py at its edges: limits, defaults, and the exact errors bad headers get.

The round trips live in test_codec_roundtrip.py; these are the cases a mutation of
wire.py (scripts/mutation) showed no test looked at.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.errors import raises_message

from blockdrv.protocol import ProtocolError
from blockdrv.protocol import options as o
from blockdrv.protocol import wire as w
from blockdrv.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    MAX_STRING,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ChunkType,
    Info,
    OptionReply,
    ReplyFlag,
)
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.protocol.wire import (
    EXTENDED_REPLY_SIZE,
    SIMPLE_REPLY_SIZE,
    SIMPLE_TYPE,
    STRUCTURED_REPLY_SIZE,
    U32_MAX,
    ReplyHeader,
    ReplyHeaderSizes,
    decode_block_status,
    decode_error,
    decode_hole,
    decode_reply_header,
    decode_request,
    encode_block_status_chunk,
    encode_block_status_payload,
    encode_chunk_header,
    encode_error_chunk,
    encode_error_payload,
    encode_hole_chunk,
    encode_none_chunk,
    encode_request,
    encode_simple_reply,
    first_reply_read,
    reply_header_size,
    reply_header_sizes,
)

STYLES = [(False, False), (True, False), (True, True)]  # (structured, extended)


def test_compact_request_length_limit_is_inclusive():
    assert encode_request(0, 0, 1, 0, U32_MAX)[-4:] == b"\xff" * 4
    with raises_message(InvalidArgumentError,
                        "length 4294967296 does not fit a compact request header"):
        encode_request(0, 0, 1, 0, U32_MAX + 1)


@pytest.mark.parametrize("extended, message", [
    (False, "bad request magic 0x00000000"),
    (True, "bad extended request magic 0x00000000"),
])
def test_request_with_bad_magic_names_it(extended, message):
    with raises_message(ProtocolError, message):
        decode_request(bytes(32 if extended else 28), extended=extended)


def test_first_reply_read():
    assert first_reply_read(False) == SIMPLE_REPLY_SIZE == 16
    assert first_reply_read(True) == EXTENDED_REPLY_SIZE == 32


@pytest.mark.parametrize("structured, extended", STYLES)
def test_reply_header_sizes_hold_exactly_the_allowed_magics(structured, extended):
    sizes = reply_header_sizes(structured=structured, extended=extended)
    assert (sizes.structured, sizes.extended) == (structured, extended)
    if extended:
        expected = {EXTENDED_REPLY_MAGIC: EXTENDED_REPLY_SIZE}
    else:
        expected = {SIMPLE_REPLY_MAGIC: SIMPLE_REPLY_SIZE}
        if structured:
            expected[STRUCTURED_REPLY_MAGIC] = STRUCTURED_REPLY_SIZE
    assert dict(sizes) == expected
    for magic, size in expected.items():
        assert reply_header_size(struct.pack(">I", magic), structured=structured,
                                 extended=extended) == size


@pytest.mark.parametrize("structured, extended", STYLES)
def test_a_new_reply_header_sizes_table_matches_the_shared_one(structured, extended):
    # (The shared tables are built at import; a new one runs the constructor again.)
    sizes = ReplyHeaderSizes(structured=structured, extended=extended)
    assert (sizes.structured, sizes.extended) == (structured, extended)
    assert sizes == reply_header_sizes(structured=structured, extended=extended)
    bad = SIMPLE_REPLY_MAGIC if extended else EXTENDED_REPLY_MAGIC
    style = "extended" if extended else "compact"
    with raises_message(ProtocolError, f"reply magic 0x{bad:08x} not allowed with the "
                                       f"negotiated {style} headers"):
        sizes[bad]


@pytest.mark.parametrize("structured, extended, magic, style", [
    (False, False, STRUCTURED_REPLY_MAGIC, "compact"),
    (True, False, EXTENDED_REPLY_MAGIC, "compact"),
    (True, True, SIMPLE_REPLY_MAGIC, "extended"),
    (True, True, STRUCTURED_REPLY_MAGIC, "extended"),
])
def test_a_magic_not_negotiated_is_named_with_the_style(structured, extended, magic, style):
    message = f"reply magic 0x{magic:08x} not allowed with the negotiated {style} headers"
    with raises_message(ProtocolError, message):
        reply_header_size(struct.pack(">I", magic), structured=structured, extended=extended)
    with raises_message(ProtocolError, message):  # the lookup table says the same
        reply_header_sizes(structured=structured, extended=extended)[magic]


@pytest.mark.parametrize("structured, extended", STYLES)
def test_an_unknown_magic_is_named(structured, extended):
    with raises_message(ProtocolError, "bad reply magic 0x12345678"):
        reply_header_size(b"\x12\x34\x56\x78", structured=structured, extended=extended)
    with raises_message(ProtocolError, "bad reply magic 0x12345678"):
        reply_header_sizes(structured=structured, extended=extended)[0x12345678]


def test_decoded_reply_headers_carry_every_field():
    assert decode_reply_header(encode_simple_reply(7, 5)) == ReplyHeader(
        SIMPLE_REPLY_MAGIC, 7, ReplyFlag.DONE, SIMPLE_TYPE, 0, 5, 0)
    assert SIMPLE_TYPE == -1
    structured = encode_hole_chunk(7, 4096, 512, done=False)[:STRUCTURED_REPLY_SIZE]
    assert decode_reply_header(structured) == ReplyHeader(
        STRUCTURED_REPLY_MAGIC, 7, 0, ChunkType.OFFSET_HOLE, 12, 0, 0)
    extended = encode_hole_chunk(7, 4096, 512, done=True, extended=True)
    assert decode_reply_header(extended[:EXTENDED_REPLY_SIZE]) == ReplyHeader(
        EXTENDED_REPLY_MAGIC, 7, ReplyFlag.DONE, ChunkType.OFFSET_HOLE, 12, 0, 4096)


@pytest.mark.parametrize("size", [SIMPLE_REPLY_SIZE, STRUCTURED_REPLY_SIZE, EXTENDED_REPLY_SIZE])
def test_reply_header_with_bad_magic_is_named(size):
    with raises_message(ProtocolError, "bad reply magic 0x12345678"):
        decode_reply_header(b"\x12\x34\x56\x78" + bytes(size - 4))


def test_reply_header_of_an_odd_size_is_refused():
    with raises_message(ProtocolError, "reply header of 17 bytes"):
        decode_reply_header(bytes(17))


def test_chunk_encoders_default_to_offset_0_and_pass_the_offset_on():
    def offset(chunk: bytes) -> int:
        return decode_reply_header(chunk[:EXTENDED_REPLY_SIZE]).offset

    assert offset(encode_chunk_header(1, ChunkType.NONE, 0, done=True, extended=True)) == 0
    assert offset(encode_none_chunk(1, extended=True)) == 0
    assert offset(encode_none_chunk(1, extended=True, offset=9)) == 9
    assert offset(encode_hole_chunk(1, 4096, 512, done=True, extended=True)) == 4096
    assert offset(encode_block_status_chunk(1, 1, [(512, 0)], done=True, extended=True)) == 0
    assert offset(encode_block_status_chunk(1, 1, [(512, 0)], done=True, extended=True,
                                            offset=9)) == 9
    assert offset(encode_error_chunk(1, 5, extended=True)) == 0
    assert offset(encode_error_chunk(1, 5, extended=True, header_offset=9)) == 9


def test_payload_encoders_defaults():
    assert encode_block_status_payload(1, [(512, 3)]) == struct.pack(">III", 1, 512, 3)
    assert encode_error_payload(5) == struct.pack(">IH", 5, 0)
    assert encode_error_chunk(1, 5)[STRUCTURED_REPLY_SIZE:] == struct.pack(">IH", 5, 0)


def test_hole_errors_are_named():
    with raises_message(ProtocolError, "OFFSET_HOLE chunk of 11 bytes, expected 12"):
        decode_hole(bytes(11))
    with raises_message(ProtocolError, "OFFSET_HOLE chunk with a hole size of 0"):
        decode_hole(bytes(12))


@pytest.mark.parametrize("payload, message", [
    (bytes(7), "BLOCK_STATUS_EXT chunk of 7 bytes"),
    (bytes(8), "BLOCK_STATUS_EXT chunk of 8 bytes claims 0 extents"),
    (struct.pack(">II", 1, 2) + bytes(16),
     "BLOCK_STATUS_EXT chunk of 24 bytes claims 2 extents"),
])
def test_extended_block_status_errors_are_named(payload, message):
    with raises_message(ProtocolError, message):
        decode_block_status(payload, extended=True)


@pytest.mark.parametrize("n", [0, 4, 8, 13, 21])
def test_compact_block_status_needs_an_extent_and_whole_ones(n):
    with raises_message(ProtocolError,
                        f"BLOCK_STATUS chunk of {n} bytes is not 4 + a multiple of 8"):
        decode_block_status(bytes(n), extended=False)


def test_error_message_may_be_as_long_as_a_string_may():
    text = "e" * MAX_STRING
    assert decode_error(encode_error_payload(5, text), ChunkType.ERROR) == (5, text, None)
    too_long = struct.pack(">IH", 5, MAX_STRING + 1) + bytes(MAX_STRING + 1)
    with raises_message(ProtocolError,
                        f"error message of {MAX_STRING + 1} bytes is over {MAX_STRING}"):
        decode_error(too_long, ChunkType.ERROR)


def test_error_message_that_is_not_utf8_is_replaced_not_refused():
    payload = struct.pack(">IH", 5, 2) + b"\xff\xfe"
    assert decode_error(payload, ChunkType.ERROR) == (5, "\ufffd\ufffd", None)


@pytest.mark.parametrize("payload, type_, message", [
    (bytes(5), ChunkType.ERROR, "error chunk of 5 bytes is shorter than 6"),
    (bytes(6), ChunkType.ERROR, "error chunk with an error value of 0"),
    (struct.pack(">IH", 5, 1) + b"ab", ChunkType.ERROR,
     "ERROR chunk of 8 bytes with a 1-byte message"),
    (struct.pack(">IH", 5, 1) + b"a", ChunkType.ERROR_OFFSET,
     "ERROR_OFFSET chunk of 7 bytes with a 1-byte message"),
    (struct.pack(">IH", 5, 3) + b"a", 0x8005, "error chunk of 7 bytes with a 3-byte message"),
])
def test_error_chunk_errors_are_named(payload, type_, message):
    with raises_message(ProtocolError, message):
        decode_error(payload, type_)


# --- test_codec_roundtrip ---

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
size63 = st.integers(0, (1 << 63) - 1)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=40)


# --- transmission ------------------------------------------------------------------------


@given(command=u16, flags=u16, cookie=u64, offset=u64, length=u32, extended=st.booleans())
def test_request_header(command, flags, cookie, offset, length, extended):
    data = w.encode_request(command, flags, cookie, offset, length, extended=extended)
    assert len(data) == w.request_size(extended)
    assert w.decode_request(data, extended=extended) == (flags, command, cookie, offset,
                                                         length)


@given(length=u64)
def test_extended_request_carries_64_bit_lengths(length):
    data = w.encode_request(6, 0, 1, 0, length, extended=True)
    assert w.decode_request(data, extended=True).length == length


def test_compact_request_refuses_64_bit_length():
    with pytest.raises(ValueError):
        w.encode_request(6, 0, 1, 0, 1 << 32)


def test_request_magic_must_match_header_style():
    compact = w.encode_request(0, 0, 1, 0, 512)
    with pytest.raises(ProtocolError):
        w.decode_request(compact + bytes(4), extended=True)
    with pytest.raises(ProtocolError):
        w.decode_request(w.encode_request(0, 0, 1, 0, 512, extended=True)[:28])


@given(cookie=u64, error=u32)
def test_simple_reply(cookie, error):
    data = w.encode_simple_reply(cookie, error)
    assert w.reply_header_size(data, structured=True, extended=False) == 16
    header = w.decode_reply_header(data)
    assert header.simple and header.done
    assert (header.cookie, header.error) == (cookie, error)


@given(cookie=u64, type_=u16, length=u32, done=st.booleans(), extended=st.booleans(),
       offset=u64)
def test_chunk_header(cookie, type_, length, done, extended, offset):
    data = w.encode_chunk_header(cookie, type_, length, done=done, extended=extended,
                                 offset=offset)
    assert w.reply_header_size(data, structured=True, extended=extended) == len(data)
    header = w.decode_reply_header(data)
    assert not header.simple
    assert (header.cookie, header.type, header.length, header.done) == (cookie, type_,
                                                                       length, done)
    if extended:
        assert header.offset == offset


def test_reply_magic_must_match_negotiation():
    simple = w.encode_simple_reply(1)
    structured = w.encode_chunk_header(1, 0, 0, done=True)
    extended = w.encode_chunk_header(1, 0, 0, done=True, extended=True)
    with pytest.raises(ProtocolError, match="not allowed"):
        w.reply_header_size(simple, structured=True, extended=True)
    with pytest.raises(ProtocolError, match="not allowed"):
        w.reply_header_size(structured, structured=False, extended=False)
    with pytest.raises(ProtocolError, match="not allowed"):
        w.reply_header_size(extended, structured=True, extended=False)
    with pytest.raises(ProtocolError, match="bad reply magic"):
        w.reply_header_size(b"\xde\xad\xbe\xef", structured=True, extended=False)


@given(cookie=u64, offset=u64, size=st.integers(1, 0xFFFFFFFF), done=st.booleans(),
       extended=st.booleans())
def test_hole_chunk(cookie, offset, size, done, extended):
    data = w.encode_hole_chunk(cookie, offset, size, done=done, extended=extended)
    header = w.decode_reply_header(data[:len(data) - 12])
    assert header.type == ChunkType.OFFSET_HOLE and header.length == 12
    assert w.decode_hole(data[-12:]) == (offset, size)


@given(cookie=u64, offset=u64, payload=st.binary(min_size=1, max_size=64),
       extended=st.booleans())
def test_data_chunk(cookie, offset, payload, extended):
    data = w.encode_data_chunk_header(cookie, offset, len(payload), done=True,
                                      extended=extended)
    header = w.decode_reply_header(data[:-8])
    assert header.type == ChunkType.OFFSET_DATA and header.length == 8 + len(payload)
    assert w.decode_offset(data[-8:]) == offset


@given(context=u32, extents=st.lists(st.tuples(st.integers(1, 0xFFFFFFFF), u32),
                                     min_size=1, max_size=20),
       extended=st.booleans())
def test_block_status_chunk(context, extents, extended):
    data = w.encode_block_status_chunk(1, context, extents, done=True, extended=extended)
    size = w.reply_header_size(data, structured=True, extended=extended)
    header = w.decode_reply_header(data[:size])
    expected_type = ChunkType.BLOCK_STATUS_EXT if extended else ChunkType.BLOCK_STATUS
    assert header.type == expected_type and header.length == len(data) - size
    assert w.decode_block_status(data[size:], extended=extended) == (context, extents)


@given(extents=st.lists(st.tuples(st.integers(1, (1 << 64) - 1),
                                  st.integers(0, (1 << 64) - 1)), min_size=1, max_size=5))
def test_extended_block_status_carries_64_bit_extents(extents):
    payload = w.encode_block_status_payload(3, extents, extended=True)
    assert w.decode_block_status(payload, extended=True) == (3, extents)


@given(error=st.integers(1, 0xFFFFFFFF), message=text, offset=st.none() | u64,
       extended=st.booleans())
def test_error_chunk(error, message, offset, extended):
    data = w.encode_error_chunk(9, error, message, offset=offset, extended=extended)
    size = w.reply_header_size(data, structured=True, extended=extended)
    header = w.decode_reply_header(data[:size])
    assert header.type == (ChunkType.ERROR if offset is None else ChunkType.ERROR_OFFSET)
    assert w.decode_error(data[size:], header.type) == (error, message, offset)


def test_none_chunk():
    for extended in (False, True):
        data = w.encode_none_chunk(5, extended=extended)
        header = w.decode_reply_header(data)
        assert header.type == ChunkType.NONE and header.done and header.length == 0


# --- handshake ---------------------------------------------------------------------------


@given(flags=u16)
def test_greeting(flags):
    assert o.decode_greeting(o.encode_greeting(flags)) == flags


@given(flags=u32)
def test_client_flags(flags):
    assert o.decode_client_flags(o.encode_client_flags(flags)) == flags


@given(option=u32, data=st.binary(max_size=100))
def test_option_request(option, data):
    raw = o.encode_option(option, data)
    assert o.decode_option_header(raw) == (option, len(data))
    assert raw[16:] == data


@given(option=u32, reply_type=u32, data=st.binary(max_size=100))
def test_option_reply(option, reply_type, data):
    raw = o.encode_option_reply(option, reply_type, data)
    assert o.decode_option_reply_header(raw) == (option, reply_type, len(data))


@given(name=text, infos=st.lists(u16, max_size=10))
def test_info_request(name, infos):
    assert o.decode_info_request(o.encode_info_request(name, infos)) == (name, infos)


@given(name=text, queries=st.lists(text, max_size=5))
def test_meta_context_request(name, queries):
    data = o.encode_meta_context_request(name, queries)
    assert o.decode_meta_context_request(data) == (name, queries)


@given(name=text, description=text)
def test_rep_server(name, description):
    assert o.decode_rep_server(o.encode_rep_server(name, description)) == (name, description)


@given(context=u32, name=text)
def test_rep_meta_context(context, name):
    assert o.decode_rep_meta_context(o.encode_rep_meta_context(context, name)) == (context,
                                                                                  name)


@given(size=size63, flags=u16)
def test_info_export(size, flags):
    assert o.decode_info(o.encode_info_export(size, flags)) == (Info.EXPORT, (size, flags))


@given(value=text, kind=st.sampled_from([Info.NAME, Info.DESCRIPTION]))
def test_info_strings(value, kind):
    assert o.decode_info(o.encode_info_string(kind, value)) == (kind, value)


@given(sizes=st.tuples(u32, u32, u32))
def test_info_block_size(sizes):
    assert o.decode_info(o.encode_info_block_size(*sizes)) == (Info.BLOCK_SIZE, sizes)


@given(size=size63, flags=u16, no_zeroes=st.booleans())
def test_export_name_reply(size, flags, no_zeroes):
    raw = o.encode_export_name_reply(size, flags, no_zeroes=no_zeroes)
    assert len(raw) == (10 if no_zeroes else 134)
    assert o.decode_export_name_reply(raw) == (size, flags)


def test_strings_obey_the_spec():
    with pytest.raises(ValueError):
        o.encode_string("x" * 4097)
    with pytest.raises(ValueError):
        o.encode_string("a\0")
    with pytest.raises(ProtocolError):
        o.decode_string(b"\xff\xfe")
    with pytest.raises(ProtocolError):
        o.decode_string(b"a\0")
    with pytest.raises(ProtocolError):
        o.decode_string(b"x" * 4097)


def test_option_error_types_have_bit_31():
    assert all((t.value >= 1 << 31) == t.name.startswith("ERR_") for t in OptionReply)
