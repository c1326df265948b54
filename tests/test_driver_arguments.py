"""Bad arguments to open_nbd: one error class, naming the parameter, before any I/O."""

from __future__ import annotations

import ssl

import pytest
import trio

from blockdrv import ConnectError, InvalidArgumentError, open_nbd
from blockdrv.protocol.errors import ConnectError as ConnectErrorBesideTheOthers

URI = "nbd+unix:///?socket=/nonexistent/blockdrv-test.sock"


@pytest.mark.parametrize("options, named", [
    ({"tls": ssl.create_default_context()}, "tls must be"),
    ({"tls": "sometimes"}, "tls must be"),
    ({"tls_context": "ca.pem"}, "tls_context must be an ssl.SSLContext"),
    ({"tls_ca": 5}, "tls_ca must be a string"),
    ({"reconnect_delay": -1}, "reconnect_delay must be at least 0"),
    ({"reconnect_delay": "30"}, "reconnect_delay must be a number"),
    ({"open_timeout": float("nan")}, "open_timeout must be"),
    ({"max_in_flight": 0}, "max_in_flight must be at least 1"),
    ({"max_in_flight": 70000}, "max_in_flight must be at most 65535"),
    ({"max_in_flight": 2.5}, "max_in_flight must be an integer"),
    ({"retry_initial": 0}, "retry_initial must be positive"),
    ({"retry_initial": 4, "retry_max": 2}, "retry_max .* must not be below"),
    ({"connect_timeout": 0}, "connect_timeout must be positive"),
    ({"cancel_timeout": -5}, "cancel_timeout must be positive"),
    ({"connections": 0}, "connections must be at least 1"),
    ({"connections": True}, "connections must be an integer"),
    ({"socket_buffer_size": -1}, "socket_buffer_size must be positive"),
    ({"meta_contexts": "qemu:dirty-bitmap:b0"}, "meta_contexts must be a list"),
    ({"guard_writes": "yes"}, "guard_writes must be True or False"),
    ({"export": 7}, "export must be a string"),
])
async def test_a_bad_argument_is_named(options, named):
    with trio.fail_after(10), pytest.raises(InvalidArgumentError, match=named) as caught:
        async with open_nbd(URI, **options):
            pass
    assert isinstance(caught.value, ValueError)  # `except ValueError` keeps working
    assert caught.value.errno == 22


async def test_a_bad_target_is_named():
    with trio.fail_after(10), pytest.raises(InvalidArgumentError, match="target must be"):
        async with open_nbd(b"nbd://localhost/"):  # type: ignore[arg-type]
            pass
    with trio.fail_after(10), pytest.raises(InvalidArgumentError, match="scheme"):
        async with open_nbd("http://localhost/"):
            pass


async def test_connect_error_lives_beside_the_other_errors():
    assert ConnectError is ConnectErrorBesideTheOthers
    with trio.fail_after(10), pytest.raises(ConnectError):
        async with open_nbd(URI):
            pass
