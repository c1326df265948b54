"""The compiled core and the pure-Python core agree, byte stream for byte stream.

The compiled modules (``blockdrv.util.core.COMPILED``) are built from the same source
that stays beside them; this test loads that source as a second, pure copy of the
protocol modules and feeds both the same reply streams, valid and hostile (mutated
chunks, random bytes, any cut into pieces), requiring the same events, the same errors
and the same buffer contents.  Where no compiled core is installed the two copies are
both pure and the test still checks the loading.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blockdrv.protocol.replies as core_replies
import blockdrv.protocol.wire as core_wire
from blockdrv.protocol import wire as w
from blockdrv.protocol.constants import Command
from blockdrv.protocol.errors import ProtocolError
from blockdrv.protocol.events import NEED_DATA

PROTOCOL = Path(core_wire.__file__).parent


def _pure(name: str) -> ModuleType:
    """The ``.py`` source of ``blockdrv.protocol.NAME`` as a module of its own (its
    relative imports resolve to the installed siblings)."""
    fullname = f"blockdrv.protocol._pure_{name}"
    if fullname in sys.modules:
        return sys.modules[fullname]
    spec = importlib.util.spec_from_file_location(fullname, PROTOCOL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = module
    spec.loader.exec_module(module)
    return module


pure_wire = _pure("wire")
pure_replies = _pure("replies")
COOKIE, OFFSET, LENGTH, CONTEXT = 7, 4096, 2048, 1


def test_the_pure_copy_is_loaded_from_source():
    assert pure_wire.__file__.endswith("wire.py")
    assert pure_replies.ReplyCursor is not core_replies.ReplyCursor


def _outcome(replies: ModuleType, command: int, stream: bytes, cuts: list[int],
             extended: bool) -> list[object]:
    """What a reader built from ``replies`` makes of ``stream`` fed in pieces."""
    reader = replies.ReplyReader(structured=True, extended=extended)
    length = 0 if command == Command.FLUSH else LENGTH
    reader.expect(COOKIE, replies.ReplyCursor(command, OFFSET, length, 0, structured=True,
                                              extended=extended,
                                              context_ids=frozenset({CONTEXT})))
    seen: list[object] = []
    start = 0
    for end in sorted({*cuts, len(stream)}):
        reader.receive_data(stream[start:end])
        start = end
        try:
            while (event := reader.next_event()) is not NEED_DATA:
                seen.append(repr(event))
        except ProtocolError as exc:
            seen.append(("ProtocolError", str(exc)))
            break
    seen.append(("buffered", reader.buffered))
    return seen


def _chunks(extended: bool) -> st.SearchStrategy[bytes]:
    """One chunk of a reply to the request above: data, hole, block status, error or
    none, at offsets inside or outside the request, done or not."""
    offset = st.integers(OFFSET - 16, OFFSET + LENGTH + 16)
    size = st.integers(0, 600)
    done = st.booleans()
    data = st.builds(lambda o, n, d: w.encode_data_chunk_header(
        COOKIE, o, n, done=d, extended=extended) + bytes([n % 251]) * n, offset, size, done)
    hole = st.builds(lambda o, n, d: w.encode_hole_chunk(
        COOKIE, o, n, done=d, extended=extended), offset, size, done)
    status = st.builds(lambda ext: w.encode_block_status_chunk(
        COOKIE, CONTEXT, ext, done=True, extended=extended),
        st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 3)), max_size=4))
    error = st.builds(lambda code, msg, d: w.encode_error_chunk(
        COOKIE, code, msg, done=d, extended=extended), st.integers(0, 200),
        st.text(max_size=20), done)
    none = st.just(w.encode_none_chunk(COOKIE, extended=extended))
    return st.one_of(data, hole, status, error, none)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extended=st.booleans(), command=st.sampled_from([Command.READ,
                                                        Command.BLOCK_STATUS,
                                                        Command.FLUSH]),
       data=st.data())
def test_both_cores_read_every_stream_alike(extended, command, data):
    chunks = data.draw(st.lists(_chunks(extended), min_size=1, max_size=6))
    stream = bytearray(b"".join(chunks))
    for _ in range(data.draw(st.integers(0, 3))):  # hostile: bytes changed anywhere
        if stream:
            stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(
                st.integers(0, 255))
    stream.extend(data.draw(st.binary(max_size=40)))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert _outcome(core_replies, command, bytes(stream), cuts, extended) == \
        _outcome(pure_replies, command, bytes(stream), cuts, extended)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=4, max_size=40),  # (the reader waits for the magic)
       structured=st.booleans(), extended=st.booleans())
def test_both_cores_decode_headers_alike(raw, structured, extended):
    def decode(wire: ModuleType) -> object:
        try:
            size = wire.reply_header_size(raw, structured=structured, extended=extended)
            if len(raw) < size:
                return ("short", size)
            header = wire.decode_reply_header(raw[:size])
            return (size, tuple(header))
        except (ProtocolError, ValueError) as exc:
            return (type(exc).__name__, str(exc))

    assert decode(core_wire) == decode(pure_wire)


@given(command=st.integers(0, 10), flags=st.integers(0, 0xFFFF),
       cookie=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**64 - 1),
       length=st.integers(0, 2**32 - 1), extended=st.booleans())
def test_both_cores_encode_requests_alike(command, flags, cookie, offset, length,
                                          extended):
    encoded = core_wire.encode_request(command, flags, cookie, offset, length,
                                       extended=extended)
    assert encoded == pure_wire.encode_request(command, flags, cookie, offset, length,
                                               extended=extended)
    assert tuple(core_wire.decode_request(encoded, extended=extended)) == \
        tuple(pure_wire.decode_request(encoded, extended=extended))

