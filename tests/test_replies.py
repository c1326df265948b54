"""Reply validation rules and the byte-fed ReplyReader, including fuzzing."""

from __future__ import annotations

import errno
import random
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
from blockdrv.protocol.constants import ChunkType, Command, CommandFlag

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
