"""Reply validation rules and the byte-fed ReplyReader, including fuzzing."""

from __future__ import annotations

import errno
import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.errors import raises_message
from support.mutate import mutate, mutations

from blockdrv.protocol import (
    NEED_DATA,
    BlockStatus,
    ProtocolError,
    ReadData,
    ReadHole,
    ReplyCursor,
    ReplyDone,
    ReplyReader,
    ReplyState,
)
from blockdrv.protocol import wire as w
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
from blockdrv.protocol.replies import (
    CHUNK_DONE,
    READ_OFFSET,
    READ_PAYLOAD,
)
from blockdrv.protocol.wire import (
    ReplyHeader,
    encode_data_chunk_header,
    encode_hole_chunk,
    encode_simple_reply,
)

READ = Command.READ


def reader(*requests, structured=True, extended=False, contexts=frozenset({1})):
    """A ReplyReader expecting (cookie, command, offset, length[, flags]) requests."""
    r = ReplyReader(structured=structured, extended=extended)
    for cookie, command, offset, length, *flags in requests:
        r.expect(cookie, ReplyCursor(command, offset, length, flags[0] if flags else 0,
                                    structured=structured, extended=extended,
                                    context_ids=contexts))
    return r


def drain(r: ReplyReader, data: bytes = b"") -> list:
    r.receive_data(data)
    events = []
    while (event := r.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def assemble(events, offset, length) -> bytes:
    buf = bytearray(b"\xaa" * length)
    for e in events:
        if isinstance(e, ReadData):
            buf[e.offset - offset:e.offset - offset + len(e.data)] = e.data
        elif isinstance(e, ReadHole):
            buf[e.offset - offset:e.offset - offset + e.length] = bytes(e.length)
    return bytes(buf)


def data_chunk(cookie, offset, payload, done=False, extended=False):
    return w.encode_data_chunk_header(cookie, offset, len(payload), done=done,
                                      extended=extended) + payload


# --- successful replies ------------------------------------------------------------------


@pytest.mark.parametrize("extended", [False, True])
def test_read_reassembled_from_out_of_order_chunks(extended):
    r = reader((7, READ, 1000, 300), extended=extended)
    stream = (data_chunk(7, 1200, b"c" * 100, extended=extended)
              + w.encode_hole_chunk(7, 1100, 100, done=False, extended=extended)
              + data_chunk(7, 1000, b"a" * 100, extended=extended)
              + w.encode_none_chunk(7, extended=extended))
    events = drain(r, stream)
    assert events[-1] == ReplyDone(7, None)
    assert assemble(events, 1000, 300) == b"a" * 100 + bytes(100) + b"c" * 100
    assert not r.in_flight


def test_simple_read_reply_streams_in_pieces():
    r = reader((1, READ, 0, 10), structured=False)
    stream = w.encode_simple_reply(1) + b"0123456789"
    events = []
    for i in range(len(stream)):
        events += drain(r, stream[i:i + 1])
    assert assemble(events, 0, 10) == b"0123456789"
    assert events[-1] == ReplyDone(1, None)
    assert sum(isinstance(e, ReadData) for e in events) == 10


def test_interleaved_replies_reach_their_cookies():
    r = reader((1, READ, 0, 4), (2, Command.WRITE, 0, 4), (3, READ, 4, 4))
    stream = (data_chunk(3, 4, b"3333", done=True) + w.encode_none_chunk(2)
              + data_chunk(1, 0, b"11", done=False) + data_chunk(1, 2, b"11", done=True))
    events = drain(r, stream)
    dones = [e.cookie for e in events if isinstance(e, ReplyDone)]
    assert dones == [3, 2, 1]
    assert assemble([e for e in events if getattr(e, "cookie", 0) == 1], 0, 4) == b"1111"


def test_block_status_reply():
    r = reader((4, Command.BLOCK_STATUS, 0, 8192), contexts=frozenset({1, 2}))
    stream = (w.encode_block_status_chunk(4, 2, [(4096, 3)], done=False)
              + w.encode_block_status_chunk(4, 1, [(4096, 0), (8192, 1)], done=True))
    events = drain(r, stream)
    assert events[:2] == [BlockStatus(4, 2, [(4096, 3)]),
                          BlockStatus(4, 1, [(4096, 0), (8192, 1)])]
    assert events[2] == ReplyDone(4, None)


# --- errors reported by the server ------------------------------------------------------


def test_error_chunk_fails_the_request_with_errno_and_message():
    r = reader((1, Command.WRITE, 0, 512))
    (done,) = drain(r, w.encode_error_chunk(1, 28, "disk full"))
    assert done.error.errno == errno.ENOSPC
    assert done.error.server_message == "disk full"
    assert "disk full" in str(done.error)


def test_unknown_wire_error_counts_as_einval():
    r = reader((1, Command.FLUSH, 0, 0), structured=False)
    (done,) = drain(r, w.encode_simple_reply(1, 9999))
    assert done.error.errno == errno.EINVAL


def test_unknown_error_chunk_type_is_an_error_not_a_violation():
    r = reader((1, READ, 0, 512))
    payload = w.encode_error_payload(5, "future error kind") + b"extra fields"
    stream = w.encode_chunk_header(1, 0x8000 | 99, len(payload), done=True) + payload
    (done,) = drain(r, stream)
    assert done.error.errno == errno.EIO


def test_error_offset_then_more_data_then_done():
    r = reader((1, READ, 0, 1024))
    stream = (data_chunk(1, 0, b"x" * 512)
              + w.encode_error_chunk(1, 5, "bad sector", offset=600, done=False)
              + w.encode_none_chunk(1))
    events = drain(r, stream)
    assert events[-1].error.offset == 600


def test_simple_error_reply_to_read_is_accepted_with_structured_replies():
    r = reader((1, READ, 0, 512))
    (done,) = drain(r, w.encode_simple_reply(1, 22))
    assert done.error.errno == errno.EINVAL


# --- protocol violations ------------------------------------------------------------------

VIOLATIONS = {
    "unknown cookie": ([(1, READ, 0, 512)], lambda: w.encode_none_chunk(2)),
    "duplicate reply": ([(1, Command.WRITE, 0, 512)],
                        lambda: w.encode_none_chunk(1) + w.encode_none_chunk(1)),
    "data outside request": ([(1, READ, 0, 512)],
                             lambda: data_chunk(1, 256, b"x" * 512, done=True)),
    "data before request": ([(1, READ, 512, 512)], lambda: data_chunk(1, 0, b"x", done=True)),
    "overlap": ([(1, READ, 0, 512)],
                lambda: data_chunk(1, 0, b"x" * 300) + data_chunk(1, 200, b"y" * 312)),
    "hole overlap": ([(1, READ, 0, 512)],
                     lambda: w.encode_hole_chunk(1, 0, 512, done=False)
                     + w.encode_hole_chunk(1, 511, 1, done=True)),
    "short success": ([(1, READ, 0, 512)], lambda: data_chunk(1, 0, b"x" * 511, done=True)),
    "data chunk longer than request": ([(1, READ, 0, 512)],
                                       lambda: w.encode_chunk_header(1, ChunkType.OFFSET_DATA,
                                                                     0xFFFFFFFF, done=True)),
    "data for write": ([(1, Command.WRITE, 0, 4)], lambda: data_chunk(1, 0, b"abcd", True)),
    "simple success for read": ([(1, READ, 0, 4)], lambda: w.encode_simple_reply(1)),
    "none without done": ([(1, Command.FLUSH, 0, 0)],
                          lambda: w.encode_chunk_header(1, ChunkType.NONE, 0, done=False)),
    "none with payload": ([(1, Command.FLUSH, 0, 0)],
                          lambda: w.encode_chunk_header(1, ChunkType.NONE, 4, done=True)
                          + b"abcd"),
    "unknown chunk type": ([(1, READ, 0, 4)],
                           lambda: w.encode_chunk_header(1, 77, 0, done=True)),
    "error value 0": ([(1, READ, 0, 4)], lambda: w.encode_error_chunk(1, 0, "")),
    "error offset outside": ([(1, READ, 0, 4)],
                             lambda: w.encode_error_chunk(1, 5, "", offset=4)),
    "oversized error chunk": ([(1, READ, 0, 4)],
                              lambda: w.encode_chunk_header(1, ChunkType.ERROR, 1 << 30,
                                                            done=True)),
    "oversized status chunk": ([(1, Command.BLOCK_STATUS, 0, 4)],
                               lambda: w.encode_chunk_header(1, ChunkType.BLOCK_STATUS,
                                                             1 << 30, done=True)),
    "zero-length hole": ([(1, READ, 0, 4)],
                         lambda: w.encode_hole_chunk(1, 0, 0, done=True)),
    "second chunk with DF": ([(1, READ, 0, 4, CommandFlag.DF)],
                             lambda: data_chunk(1, 0, b"ab") + data_chunk(1, 2, b"cd", True)),
    "status for unknown context": ([(1, Command.BLOCK_STATUS, 0, 4)],
                                   lambda: w.encode_block_status_chunk(1, 9, [(4, 0)],
                                                                       done=True)),
    "status missing a context": ([(1, Command.BLOCK_STATUS, 0, 4)],
                                 lambda: w.encode_none_chunk(1)),
    "zero-length extent": ([(1, Command.BLOCK_STATUS, 0, 4)],
                           lambda: w.encode_block_status_chunk(1, 1, [(0, 0)], done=True)),
    "REQ_ONE with two extents": ([(1, Command.BLOCK_STATUS, 0, 8, CommandFlag.REQ_ONE)],
                                 lambda: w.encode_block_status_chunk(1, 1, [(4, 0), (4, 1)],
                                                                     done=True)),
    "extents continue past request": ([(1, Command.BLOCK_STATUS, 0, 8)],
                                      lambda: w.encode_block_status_chunk(
                                          1, 1, [(8, 0), (4, 1)], done=True)),
    "status chunk twice": ([(1, Command.BLOCK_STATUS, 0, 8)],
                           lambda: w.encode_block_status_chunk(1, 1, [(8, 0)], done=False) * 2),
    "chunk after done": ([(1, READ, 0, 4), (2, READ, 0, 4)],
                         lambda: data_chunk(1, 0, b"abcd", True) + w.encode_none_chunk(1)),
}


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violations_are_protocol_errors(name):
    requests, stream = VIOLATIONS[name]
    r = reader(*requests)
    with pytest.raises(ProtocolError):
        drain(r, stream())
    with pytest.raises(ProtocolError):  # the reader stays dead
        r.next_event()


def test_header_style_mismatches():
    r = reader((1, Command.BLOCK_STATUS, 0, 4), extended=True)
    with pytest.raises(ProtocolError, match="header style"):
        drain(r, w.encode_chunk_header(1, ChunkType.BLOCK_STATUS, 12, done=True,
                                       extended=True))
    r = reader((1, Command.FLUSH, 0, 0), extended=True)
    with pytest.raises(ProtocolError, match="not allowed"):
        drain(r, w.encode_simple_reply(1))
    r = reader((1, Command.FLUSH, 0, 0), structured=False)
    with pytest.raises(ProtocolError, match="not allowed"):
        drain(r, w.encode_none_chunk(1))


def test_hostile_lengths_allocate_nothing():
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for type_ in (ChunkType.ERROR, ChunkType.BLOCK_STATUS, ChunkType.OFFSET_DATA):
            r = reader((1, READ if type_ == ChunkType.OFFSET_DATA else Command.BLOCK_STATUS,
                        0, 1 << 20), extended=True)
            with pytest.raises(ProtocolError):
                drain(r, w.encode_chunk_header(1, type_, (1 << 64) - 1, done=True,
                                               extended=True))
        assert tracemalloc.get_traced_memory()[1] - base < 256 * 1024
    finally:
        tracemalloc.stop()


# --- bounded bookkeeping: chunk count, scattered pieces ----------------------------------


@pytest.mark.parametrize("order", ["forward", "reverse", "outside-in"])
def test_adjacent_chunks_join_into_one_range(order):
    """In-order, reverse and outside-in chunks keep one range (plus the gap), however
    many there are: the bookkeeping does not grow with the chunk count."""
    state = ReplyState(READ, 0, 1024, structured=True)
    starts = list(range(0, 1024, 4))
    if order == "reverse":
        starts.reverse()
    elif order == "outside-in":
        pairs = zip(starts, reversed(starts), strict=True)
        starts = [x for pair in pairs for x in pair][:len(starts)]
    for start in starts:
        state.data(start, 4)
        assert len(state._ranges) <= 2
    assert state._ranges == [(0, 1024)] and state.covered == 1024


def test_scattered_chunks_past_the_fragment_cap_are_a_violation():
    from blockdrv.protocol.constants import MAX_REPLY_FRAGMENTS
    state = ReplyState(READ, 0, 2 * (MAX_REPLY_FRAGMENTS + 1), structured=True)
    for i in range(MAX_REPLY_FRAGMENTS):
        state.data(2 * i, 1)  # every other byte: nothing joins
    with pytest.raises(ProtocolError, match="MAX_REPLY_FRAGMENTS"):
        state.data(2 * MAX_REPLY_FRAGMENTS, 1)
    state.data(1, 1)  # a chunk that joins two ranges is fine at the cap


def test_gaps_filled_later_join_both_neighbours():
    state = ReplyState(READ, 100, 30, structured=True)
    for start in (100, 120, 110):
        state.data(start, 10)
    assert state._ranges == [(100, 130)]
    with pytest.raises(ProtocolError, match="overlaps"):
        state.hole(105, 2)


def test_a_reply_longer_than_the_chunk_cap_is_a_violation():
    """1024 chunks plus one per 512 bytes asked for: a 4096-byte READ may have 1032."""
    r = reader((1, READ, 0, 4096))
    stream = b"".join(w.encode_error_chunk(1, 5, "again", done=False) for _ in range(1032))
    assert len(drain(r, stream)) == 0  # error chunks make no events until the end
    with pytest.raises(ProtocolError, match="MAX_REPLY_CHUNKS"):
        drain(r, w.encode_error_chunk(1, 5, "again", done=False))


def test_the_cursor_says_what_to_read_next():
    """ReplyCursor steps: offset, data (resumable in pieces), payload, done."""
    from blockdrv.protocol.replies import CHUNK_DONE, READ_DATA, READ_OFFSET, READ_PAYLOAD

    cursor = ReplyCursor(READ, 1000, 300, structured=True)
    header = w.decode_reply_header(w.encode_data_chunk_header(7, 1100, 100, done=False)[:20])
    assert cursor.begin(header) == READ_OFFSET
    cursor.data_offset(1100)
    assert (cursor.step, cursor.at, cursor.left) == (READ_DATA, 100, 100)
    cursor.data_read(60)
    assert (cursor.step, cursor.at, cursor.left) == (READ_DATA, 160, 40)
    cursor.data_read(40)
    assert cursor.step == CHUNK_DONE and not cursor.finished
    hole = w.encode_hole_chunk(7, 1000, 100, done=False)
    assert cursor.begin(w.decode_reply_header(hole[:20])) == READ_PAYLOAD
    assert cursor.left == 12
    assert cursor.payload(hole[20:]) == ReadHole(7, 1000, 100)
    rest = w.encode_hole_chunk(7, 1200, 100, done=True)
    cursor.begin(w.decode_reply_header(rest[:20]))
    cursor.payload(rest[20:])
    assert cursor.finished and cursor.finish() is None and cursor.chunks == 3


# --- fuzzing --------------------------------------------------------------------------------


def valid_stream(rng: random.Random, structured: bool, extended: bool):
    """Requests, a valid reply stream for them, and the data each READ must return."""
    requests, replies, expected = [], [], {}
    for cookie in range(1, rng.randint(1, 5) + 1):
        parts: list[bytes] = []
        replies.append(parts)
        command = rng.choice([READ, READ, Command.WRITE, Command.BLOCK_STATUS]
                             if structured else [READ, Command.WRITE])
        offset, length = rng.randrange(0, 1 << 20), rng.randint(1, 300)
        requests.append((cookie, command, offset, length))
        if command == READ:
            data = bytes(rng.randrange(256) for _ in range(length))
            expected[cookie] = data
            if not structured:
                parts.append(w.encode_simple_reply(cookie) + data)
                continue
            cut = rng.randint(0, length)
            pieces = [(offset, data[:cut]), (offset + cut, data[cut:])]
            pieces = [p for p in pieces if p[1]]
            rng.shuffle(pieces)
            for i, (at, payload) in enumerate(pieces):
                if payload.count(0) == len(payload):
                    parts.append(w.encode_hole_chunk(cookie, at, len(payload),
                                                     done=i == len(pieces) - 1,
                                                     extended=extended))
                else:
                    parts.append(data_chunk(cookie, at, payload, i == len(pieces) - 1,
                                            extended))
        elif command == Command.BLOCK_STATUS:
            parts.append(w.encode_block_status_chunk(cookie, 1, [(length, 1)], done=True,
                                                     extended=extended))
        elif structured:
            parts.append(w.encode_none_chunk(cookie, extended=extended))
        else:
            parts.append(w.encode_simple_reply(cookie))
    # Interleave the replies at random, keeping each reply's chunks in order.
    stream = []
    while replies:
        parts = rng.choice(replies)
        stream.append(parts.pop(0))
        if not parts:
            replies.remove(parts)
    return requests, b"".join(stream), expected


def run_reader(requests, stream, structured, extended, chunk):
    r = reader(*requests, structured=structured, extended=extended)
    events = []
    for i in range(0, len(stream), chunk):
        events += drain(r, stream[i:i + chunk])
        assert r.buffered <= len(stream)
    return events


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), structured=st.booleans(), extended=st.booleans(),
       chunk=st.integers(1, 64))
def test_valid_streams_return_exactly_the_data(seed, structured, extended, chunk):
    extended = extended and structured
    requests, stream, expected = valid_stream(random.Random(seed), structured, extended)
    events = run_reader(requests, stream, structured, extended, chunk)
    done = {e.cookie: e.error for e in events if isinstance(e, ReplyDone)}
    assert done == {cookie: None for cookie, *_ in requests}
    for cookie, data in expected.items():
        offset = next(o for c, _, o, _ in requests if c == cookie)
        mine = [e for e in events if getattr(e, "cookie", None) == cookie]
        assert assemble(mine, offset, len(data)) == data


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), structured=st.booleans(), extended=st.booleans(),
       chunk=st.integers(1, 64), changes=mutations)
def test_mutated_streams_give_only_protocol_errors(seed, structured, extended, chunk,
                                                   changes):
    extended = extended and structured
    requests, stream, _ = valid_stream(random.Random(seed), structured, extended)
    data = mutate(stream, changes)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            run_reader(requests, bytes(data), structured, extended, chunk)
        except ProtocolError:
            pass
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024 + 4 * len(data)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), structured=st.booleans(), extended=st.booleans(),
       chunk=st.integers(1, 64))
def test_arbitrary_bytes_give_only_protocol_errors(data, structured, extended, chunk):
    extended = extended and structured
    requests = [(1, READ, 0, 4096), (2, Command.WRITE, 0, 512),
                (3, Command.BLOCK_STATUS, 0, 4096)]
    try:
        run_reader(requests, data, structured, extended, chunk)
    except ProtocolError:
        pass


def test_arbitrary_bytes_with_valid_header_prefixes():
    """Random payloads behind syntactically valid headers of every type."""
    rng = random.Random(1234)
    for _ in range(3000):
        extended = rng.random() < 0.5
        type_ = rng.choice(list(ChunkType) + [rng.randrange(1 << 16)])
        length = rng.choice([0, 1, 4, 8, 12, 13, 20, 28, rng.randrange(1 << 16)])
        payload = bytes(rng.randrange(256) for _ in range(min(length, 64)))
        stream = w.encode_chunk_header(rng.choice([1, 2, 3]), type_, length,
                                       done=rng.random() < 0.5, extended=extended) + payload
        try:
            run_reader([(1, READ, 0, 4096), (2, Command.WRITE, 0, 512),
                        (3, Command.BLOCK_STATUS, 0, 4096)], stream, True, extended, 7)
        except ProtocolError:
            pass


# --- test_protocol_replies ---

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
