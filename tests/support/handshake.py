"""Run the client and server negotiators against each other in memory."""

from __future__ import annotations

from typing import Callable

from blockdrv.protocol import NEED_DATA, ClientNegotiator, StartTLS
from blockdrv.protocol.server_negotiate import ServerNegotiator


def converse(client: ClientNegotiator, server: ServerNegotiator,
             split: Callable[[bytes], list[bytes]] = lambda b: [b]) -> tuple[object, object]:
    """Shuttle bytes until the client has its final event; returns (client, server) events.

    ``split`` cuts every transfer into pieces to exercise partial reads.  A StartTLS on
    either side is a no-op upgrade here (both sides are told TLS started).
    """
    client_event: object = NEED_DATA
    server_final: object = NEED_DATA

    def step_server() -> None:
        nonlocal server_final
        event = server.next_event()
        if isinstance(event, StartTLS):
            server.tls_started()
        elif event is not NEED_DATA and server_final is NEED_DATA:
            server_final = event

    for _ in range(1000):
        for piece in split(server.data_to_send()):
            client.receive_data(piece)
        client_event = client.next_event()
        for piece in split(client.data_to_send()):
            server.receive_data(piece)
        step_server()
        if isinstance(client_event, StartTLS):
            client.tls_started()
            continue
        if client_event is not NEED_DATA:
            # Let the server see what the client queued last (ABORT after a query).
            for piece in split(client.data_to_send()):
                server.receive_data(piece)
            step_server()
            return client_event, server_final
    raise AssertionError("handshake did not finish")
