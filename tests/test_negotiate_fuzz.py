"""Fuzz the client negotiator: arbitrary and mutated server byte streams.

Only ProtocolError (a broken server), OptionError (a well-formed refusal) or "need more
data" may ever come out, and memory stays bounded whatever lengths the bytes claim.
"""

from __future__ import annotations

import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.mutate import mutate, mutations
from test_negotiate import DISK

from blockdrv.protocol import NEED_DATA, ClientNegotiator, OptionError, ProtocolError, StartTLS
from blockdrv.protocol.negotiate import TLSMode
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


def feed(config, data: bytes, chunk: int) -> None:
    client = ClientNegotiator("disk", **config)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
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
        except (ProtocolError, OptionError):
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 128 * 1024 + 4 * len(data)


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
