"""Fuzz the client negotiator: arbitrary and mutated server byte streams.

Only ProtocolError (a broken server), OptionError (a well-formed refusal) or "need more
data" may ever come out, and memory stays bounded whatever lengths the bytes claim.
"""

from __future__ import annotations

import tracemalloc
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.mutate import mutate, mutations
from test_negotiate import DISK, greet, reply

from blockdrv.protocol import (
    NEED_DATA,
    ClientNegotiator,
    Goal,
    OptionError,
    ProtocolError,
    StartTLS,
    negotiate,
)
from blockdrv.protocol.constants import Option, OptionReply
from blockdrv.protocol.negotiate import TLSMode
from blockdrv.protocol.options import encode_rep_meta_context, encode_rep_server
from blockdrv.protocol.server_negotiate import ServerNegotiator

configs = st.fixed_dictionaries({
    "extended": st.booleans(), "structured": st.booleans(),
    "tls": st.sampled_from(list(TLSMode)),
})


def transcript(config) -> bytes:
    """Everything a server says in a successful handshake with this client config."""
    client = ClientNegotiator("disk", **config)
    server = ServerNegotiator({"disk": DISK}, tls=TLSMode.ALLOW)
    said = bytearray()
    for _ in range(100):
        out = server.data_to_send()
        said += out
        client.receive_data(out)
        event = client.next_event()
        server.receive_data(client.data_to_send())
        if isinstance(server.next_event(), StartTLS):
            server.tls_started()
        if isinstance(event, StartTLS):
            client.tls_started()
        elif event is not NEED_DATA:
            return bytes(said)
    raise AssertionError("no handshake")


def drive(client: ClientNegotiator, data: bytes, chunk: int) -> None:
    """Feed ``data`` in ``chunk``-byte pieces until the handshake ends, raises or runs out."""
    for i in range(0, len(data), chunk):
        client.receive_data(data[i:i + chunk])
        while True:
            event = client.next_event()
            client.data_to_send()
            if isinstance(event, StartTLS):
                client.tls_started()
                continue
            break
        if event is not NEED_DATA:
            return


def peak_memory(client: ClientNegotiator, data: bytes, chunk: int) -> int:
    """The most memory the negotiator held while fed ``data``, however the handshake ended."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            drive(client, data, chunk)
        except (ProtocolError, OptionError):
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def feed(config, data: bytes, chunk: int) -> None:
    # Checked on every path: the handshake completing, raising, or running out of input.
    peak = peak_memory(ClientNegotiator("disk", **config), data, chunk)
    assert peak < 128 * 1024 + 4 * len(data)


# Small caps so that a flood far past them is quick to build; what is checked is that the
# negotiator holds no more than the caps allow however many entries the server sends, and
# whether the flood ends in the cap's ProtocolError, a completed list, or runs out.
FLOOD_ENTRIES, FLOOD_BYTES, FLOOD_LENGTH = 32, 4096, 4000
FLOOD_BOUND = 64 * 1024


@pytest.mark.parametrize("acked", [False, True], ids=["runs-out", "acked"])
@pytest.mark.parametrize("name_size", [0, 60])
@pytest.mark.parametrize("goal", [Goal.LIST, Goal.LIST_META_CONTEXT])
def test_list_floods_stay_within_the_caps(goal, name_size, acked):
    option = Option.LIST if goal is Goal.LIST else Option.LIST_META_CONTEXT

    def entry(i: int) -> bytes:  # distinct names: a set of contexts must not absorb them
        name = f"x:{i:05d}" + "c" * name_size
        if goal is Goal.LIST:
            return reply(option, OptionReply.SERVER, encode_rep_server(name))
        return reply(option, OptionReply.META_CONTEXT, encode_rep_meta_context(i, name))

    data = (greet() + b"".join(entry(i) for i in range(FLOOD_LENGTH))
            + (reply(option) if acked else b""))
    with mock.patch.object(negotiate, "MAX_LIST_ENTRIES", FLOOD_ENTRIES), \
            mock.patch.object(negotiate, "MAX_LIST_BYTES", FLOOD_BYTES):
        client = ClientNegotiator("disk", goal=goal, structured=False, extended=False)
        assert peak_memory(client, data, 4096) < FLOOD_BOUND


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, data=st.binary(max_size=400), chunk=st.integers(1, 50))
def test_arbitrary_bytes(config, data, chunk):
    feed(config, data, chunk)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, chunk=st.integers(1, 50), changes=mutations)
def test_mutated_transcripts(config, chunk, changes):
    feed(config, mutate(transcript(config), changes), chunk)


def test_transcript_is_accepted_unmutated():
    # (With TLS the transcript cannot be fed in one piece: bytes after the STARTTLS
    # acknowledgement would arrive as plaintext, which the client rightly refuses.)
    for extended in (False, True):
        config = {"extended": extended, "structured": True, "tls": TLSMode.OFF}
        client = ClientNegotiator("disk", **config)
        client.receive_data(transcript(config))
        event = client.next_event()
        assert event.info.size == DISK.size and event.info.extended is extended
