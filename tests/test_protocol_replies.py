"""ReplyState at its edges: each rule alone, and the exact error it gives.

test_replies.py drives whole replies through the reader; these are the cases a mutation
of replies.py (scripts/mutation) showed no test looked at: each condition of a rule on
its own, the boundaries, and the messages (a violation names the request and the rule).
"""

from __future__ import annotations

import errno

import pytest
from support.errors import raises_message

from blockdrv.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    MAX_BLOCK_STATUS_CHUNK,
    MAX_REPLY_FRAGMENTS,
    MAX_SMALL_CHUNK,
    SIMPLE_REPLY_MAGIC,
    ChunkType,
    Command,
    CommandFlag,
)
from blockdrv.protocol.errors import ProtocolError
from blockdrv.protocol.events import NEED_DATA
from blockdrv.protocol.replies import (
    CHUNK_DONE,
    READ_OFFSET,
    READ_PAYLOAD,
    ReplyCursor,
    ReplyReader,
    ReplyState,
)
from blockdrv.protocol.wire import (
    ReplyHeader,
    encode_data_chunk_header,
    encode_hole_chunk,
    encode_simple_reply,
)

READ, BLOCK_STATUS, WRITE = Command.READ, Command.BLOCK_STATUS, Command.WRITE
EXTENDED_MAGIC = EXTENDED_REPLY_MAGIC.to_bytes(4, "big")


def state(command=READ, offset=0, length=4096, flags=0, **kw) -> ReplyState:
    kw.setdefault("structured", True)
    return ReplyState(command, offset, length, flags, **kw)


def violation(what: str, command: str = "READ", offset: int = 0, length: int = 4096):
    return raises_message(ProtocolError, f"server reply to {command} {offset}+{length}: {what}")


def header(type_: int, length: int, *, done: bool = False) -> ReplyHeader:
    return ReplyHeader(0x668E33EF, 1, 1 if done else 0, type_, length)


@pytest.mark.parametrize("before", ["done", "range", "status", "error"])
def test_a_simple_reply_after_any_other_message_is_a_violation(before):
    s = state(BLOCK_STATUS if before == "status" else READ, context_ids={1})
    if before == "done":
        s.chunk(header(ChunkType.NONE, 0, done=True))
    elif before == "range":
        s.hole(0, 512)
    elif before == "status":
        s.block_status(1, [(4096, 0)])
    else:
        s.error_chunk(5, "", None)
    command = "BLOCK_STATUS" if before == "status" else "READ"
    with violation("simple reply after other reply messages", command):
        s.simple(5)


def test_successful_simple_read_after_structured_replies_is_a_violation():
    with violation("successful simple reply to READ after structured replies were "
                   "negotiated"):
        state().simple(0)
    assert state(structured=False).simple(0) is True  # READ data follows
    assert state(structured=False, length=0).simple(0) is False  # nothing follows
    assert state(structured=False, length=1).simple(0) is True


def test_block_status_needs_structured_success_but_may_fail_simply():
    with violation("successful simple reply to BLOCK_STATUS", "BLOCK_STATUS"):
        state(BLOCK_STATUS).simple(0)
    s = state(BLOCK_STATUS)
    assert s.simple(1) is False
    assert s.finish().errno == errno.EPERM


def test_a_simple_error_is_the_requests_error():
    s = state(structured=False, offset=512, length=1024)
    assert s.simple(5) is False
    error = s.finish()
    assert error.errno == errno.EIO and error.server_message == "" and error.offset is None
    assert error.strerror == "READ 512+1024 failed: EIO (Input/output error)"


def test_an_unknown_command_is_named_by_number():
    with violation("successful simple reply to BLOCK_STATUS", "BLOCK_STATUS"):
        state(BLOCK_STATUS).simple(0)
    s = state(99, structured=False)
    s.simple(5)
    assert s.finish().strerror == "command 99 0+4096 failed: EIO (Input/output error)"
    with violation("NONE chunk without the DONE flag", "command 99"):
        state(99).chunk(header(ChunkType.NONE, 0))


def test_content_outside_the_request_is_named():
    with violation("hole chunk 4096+512 outside the request"):
        state().hole(4096, 512)
    with violation("data chunk 0+8192 outside the request"):
        state().data(0, 8192)


def test_content_outside_the_request_is_named_on_the_cursor_path_too():
    cursor = ReplyCursor(READ, 0, 4096, structured=True)  # how the driver reads data
    cursor.begin(header(ChunkType.OFFSET_DATA, 8 + 512))
    with violation("data chunk 4096+512 outside the request"):
        cursor.data_offset(4096)


def test_scattered_content_past_the_fragment_cap_is_named():
    s = state(length=2 * MAX_REPLY_FRAGMENTS + 2)
    for i in range(MAX_REPLY_FRAGMENTS):
        s.hole(2 * i, 1)
    with violation(f"content chunks scattered over more than {MAX_REPLY_FRAGMENTS} "
                   "separate ranges (MAX_REPLY_FRAGMENTS)",
                   length=2 * MAX_REPLY_FRAGMENTS + 2):
        s.hole(2 * MAX_REPLY_FRAGMENTS, 1)


@pytest.mark.parametrize("extents, what", [
    ([], "block status chunk without extents"),
    ([(512, 0), (0, 0)], "block status extent of length 0"),
])
def test_bad_block_status_is_named(extents, what):
    with violation(what, "BLOCK_STATUS"):
        state(BLOCK_STATUS, context_ids={1}).block_status(1, extents)


def test_block_status_contexts_are_checked():
    s = state(BLOCK_STATUS, context_ids={1})
    with violation("block status for unknown context id 2", "BLOCK_STATUS"):
        s.block_status(2, [(512, 0)])
    s.block_status(1, [(512, 0)])
    with violation("second block status chunk for context id 1", "BLOCK_STATUS"):
        s.block_status(1, [(512, 0)])


def test_req_one_allows_one_extent_up_to_the_length_whatever_its_flags():
    one = int(CommandFlag.REQ_ONE)
    state(BLOCK_STATUS, length=4096, flags=one, context_ids={1}).block_status(
        1, [(4096, 0xFFFFFFFF)])
    for extents in ([(4097, 0)], [(512, 0), (512, 0)]):
        with violation("more than one extent, or a longer one, despite REQ_ONE",
                       "BLOCK_STATUS"):
            state(BLOCK_STATUS, flags=one, context_ids={1}).block_status(1, extents)


@pytest.mark.parametrize("offset, length, error_offset, inside", [
    (4096, 512, 4095, False), (4096, 512, 4096, True), (4096, 512, 4607, True),
    (4096, 512, 4608, False), (4096, 0, 4096, True), (4096, 0, 4097, False),
])
def test_error_offset_must_fall_in_the_request(offset, length, error_offset, inside):
    s = state(WRITE, offset=offset, length=length)
    if inside:
        s.error_chunk(5, "m", error_offset)
        assert s.error.offset == error_offset
    else:
        with violation(f"error offset {error_offset} outside the request", "WRITE",
                       offset, length):
            s.error_chunk(5, "m", error_offset)


@pytest.mark.parametrize("command, prepare, chunk, what", [
    (READ, "done", header(ChunkType.NONE, 0, done=True), "chunk after the final (DONE) chunk"),
    (READ, "simple", header(ChunkType.NONE, 0, done=True),
     "structured chunk without structured replies"),
    (READ, None, header(ChunkType.NONE, 4, done=True), "NONE chunk with a 4-byte payload"),
    (WRITE, None, header(ChunkType.OFFSET_HOLE, 12), "OFFSET_HOLE chunk for a non-READ request"),
    (WRITE, None, header(ChunkType.OFFSET_DATA, 16), "OFFSET_DATA chunk for a non-READ request"),
    (READ, "df", header(ChunkType.OFFSET_HOLE, 12),
     "second content chunk despite DF (don't fragment)"),
])
def test_bad_chunk_headers_are_named(command, prepare, chunk, what):
    s = state(command, flags=int(CommandFlag.DF) if prepare == "df" else 0,
              structured=prepare != "simple")
    if prepare == "done":
        s.chunk(header(ChunkType.NONE, 0, done=True))
    elif prepare == "df":
        s.chunk(header(ChunkType.OFFSET_HOLE, 12))
    with violation(what, command.name):
        s.chunk(chunk)


def test_finish_names_what_is_missing():
    with violation("reply finished without a DONE chunk"):
        state().finish()
    s = state()
    s.hole(0, 1024)
    s.chunk(header(ChunkType.NONE, 0, done=True))
    with violation("successful reply covers 1024 of 4096 bytes"):
        s.finish()
    s = state(BLOCK_STATUS, context_ids={1, 2})
    s.block_status(1, [(4096, 0)])
    s.chunk(header(ChunkType.NONE, 0, done=True))
    with violation("successful reply lacks a block status chunk for some context",
                   "BLOCK_STATUS"):
        s.finish()


def test_block_status_past_the_request_is_named():
    s = state(BLOCK_STATUS, length=1024, context_ids={1})
    with violation("block status extents continue past the request", "BLOCK_STATUS",
                   length=1024):
        s.block_status(1, [(1024, 0), (512, 0)])
    # The last extent may run past the end; the ones before it may not reach it.
    state(BLOCK_STATUS, length=1024, context_ids={1}).block_status(1, [(512, 0), (4096, 0)])


def test_an_error_chunk_names_its_offset_and_the_servers_message():
    s = state(WRITE, offset=4096, length=512)
    s.error_chunk(28, "disk full", 4100)
    s.error_chunk(5, "second", None)  # the first error is kept
    s.chunk(header(ChunkType.NONE, 0, done=True))
    error = s.finish()
    assert error.strerror == ("WRITE 4096+512 failed: ENOSPC (No space left on device) "
                              "at offset 4100: disk full")
    assert (error.errno, error.server_message, error.offset) == (errno.ENOSPC, "disk full",
                                                                 4100)


def test_repr_says_where_the_reply_is():
    s = state(offset=512, length=1024)
    s.hole(512, 256)
    assert repr(s) == "<ReplyState READ 512+1024 covered=256 done=False>"


def test_cursor_steps_are_checked_and_a_payload_leaves_nothing_to_read():
    cursor = ReplyCursor(READ, 0, 4096, structured=True)
    assert cursor.begin(header(ChunkType.OFFSET_HOLE, 12)) == READ_PAYLOAD
    assert cursor.left == 12
    with pytest.raises(AssertionError):  # a reader that reads the wrong thing
        cursor.data_offset(0)
    cursor.payload(encode_hole_chunk(1, 0, 4096, done=False)[-12:])
    assert (cursor.left, cursor.step) == (0, CHUNK_DONE)
    assert cursor.begin(header(ChunkType.OFFSET_DATA, 8 + 16)) == READ_OFFSET
    with pytest.raises(AssertionError):
        cursor.payload(b"")


def test_a_chunk_reaching_into_the_next_range_overlaps_it():
    s = state()
    s.hole(50, 10)
    with violation("hole chunk 0+55 overlaps an earlier chunk"):
        s.hole(0, 55)


@pytest.mark.parametrize("command, chunk, what", [
    (READ, header(ChunkType.OFFSET_HOLE, 11), "OFFSET_HOLE chunk of 11 bytes"),
    (READ, header(ChunkType.OFFSET_DATA, 8 + 4097),
     "OFFSET_DATA chunk of 4105 bytes for a 4096-byte read"),
    (READ, header(ChunkType.OFFSET_DATA, 8), "OFFSET_DATA chunk of 8 bytes for a 4096-byte read"),
    (READ, header(ChunkType.BLOCK_STATUS, 12),
     "block status chunk for a non-BLOCK_STATUS request"),
    (BLOCK_STATUS, header(ChunkType.BLOCK_STATUS_EXT, 24),
     "BLOCK_STATUS_EXT chunk does not match the negotiated header style"),
    (BLOCK_STATUS, header(ChunkType.BLOCK_STATUS, MAX_BLOCK_STATUS_CHUNK + 1),
     f"block status chunk of {MAX_BLOCK_STATUS_CHUNK + 1} bytes is too large"),
    (READ, header(ChunkType.ERROR, MAX_SMALL_CHUNK + 1),
     f"error chunk of {MAX_SMALL_CHUNK + 1} bytes is too large"),
    (READ, header(7, 0), "unknown chunk type 7"),
])
def test_more_bad_chunk_headers_are_named(command, chunk, what):
    with violation(what, command.name):
        state(command).chunk(chunk)


def test_chunk_sizes_at_the_caps_are_accepted():
    state(READ).chunk(header(ChunkType.OFFSET_DATA, 8 + 4096))
    state(BLOCK_STATUS).chunk(header(ChunkType.BLOCK_STATUS, MAX_BLOCK_STATUS_CHUNK))
    state(READ).chunk(header(ChunkType.ERROR, MAX_SMALL_CHUNK))


def test_cursor_has_nothing_to_read_after_an_error_reply_or_a_none_chunk():
    simple = ReplyCursor(WRITE, 0, 512)
    assert simple.begin(ReplyHeader(SIMPLE_REPLY_MAGIC, 1, 1, -1, 0, 5)) == CHUNK_DONE
    assert simple.step == CHUNK_DONE and simple.finished
    none = ReplyCursor(WRITE, 0, 512, structured=True)
    assert none.begin(header(ChunkType.NONE, 0, done=True)) == CHUNK_DONE
    assert none.finished


def test_pieces_out_of_order_insert_and_join_in_every_way():
    s = state(length=200)
    s.hole(100, 10)  # [100, 110)
    s.hole(0, 10)  # before everything, touching nothing
    s.hole(50, 10)  # between two ranges, touching neither
    with violation("hole chunk 5+1 overlaps an earlier chunk", length=200):
        s.hole(5, 1)
    s.hole(10, 40)  # joins both neighbours: [0, 60)
    with violation("hole chunk 55+1 overlaps an earlier chunk", length=200):
        s.hole(55, 1)
    s.hole(60, 40)  # joins both again: [0, 110)
    s.hole(110, 90)  # in order, after everything
    for at in (5, 55, 105, 150):  # one range now: everything overlaps it
        with violation(f"hole chunk {at}+1 overlaps an earlier chunk", length=200):
            s.hole(at, 1)
    s.chunk(header(ChunkType.NONE, 0, done=True))
    assert s.finish() is None and s.covered == 200


def test_a_new_state_is_compact_unflagged_and_has_read_nothing():
    s = ReplyState(READ, 0, 4096)
    assert (s.flags, s.structured, s.extended) == (0, False, False)
    assert (s.step, s.at, s.left, s.header, s.chunks) == (CHUNK_DONE, 0, 0, None, 0)
    assert s.simple(0) is True  # compact: a successful simple READ reply carries data


def test_the_byte_reader_defaults_to_compact_simple_replies():
    for reader, magic in [(ReplyReader(), encode_hole_chunk(1, 0, 512, done=True)[:4]),
                          (ReplyReader(structured=True), EXTENDED_MAGIC)]:
        reader.receive_data(magic)
        with raises_message(ProtocolError, f"reply magic 0x{magic.hex()} not allowed with "
                                           "the negotiated compact headers"):
            reader.next_event()


def test_the_byte_reader_looks_at_a_magic_as_soon_as_it_has_one():
    reader = ReplyReader()
    reader.receive_data(b"\0\0\0\0")
    with raises_message(ProtocolError, "bad reply magic 0x00000000"):
        reader.next_event()


def test_the_byte_reader_names_an_unknown_cookie_and_a_cookie_given_twice():
    reader = ReplyReader()
    reader.expect(1, ReplyCursor(READ, 0, 4096))
    with pytest.raises(ValueError, match="^cookie 1 is already in flight$"):
        reader.expect(1, ReplyCursor(READ, 0, 4096))
    reader.receive_data(encode_simple_reply(9))
    with raises_message(ProtocolError, "reply for unknown cookie 9"):
        reader.next_event()


def test_the_byte_reader_takes_a_data_offset_once_all_eight_bytes_are_in():
    reader = ReplyReader(structured=True)
    reader.expect(1, ReplyCursor(READ, 0, 4096, structured=True))
    reader.receive_data(encode_data_chunk_header(1, 0, 512, done=True))  # header + offset
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 0  # the offset was read; the data is next
