"""Every message type survives encode -> decode, both directions (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockdrv.protocol import ProtocolError
from blockdrv.protocol import options as o
from blockdrv.protocol import wire as w
from blockdrv.protocol.constants import ChunkType, Info, OptionReply

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
