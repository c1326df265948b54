"""Opening: bad arguments (one error class, naming the parameter, before any I/O),
open timeouts, and the errors an open ends with."""

from __future__ import annotations

import errno
import ssl

import pytest
import trio
import trio.testing
from support.inprocess import (
    URI,
    InProcessServer,
    disk,
    serving,
)

from blockdrv import (
    ConnectError,
    InvalidArgumentError,
    open_nbd,
)
from blockdrv.protocol.errors import ConnectError as ConnectErrorBesideTheOthers
from blockdrv.util.units import MiB

NOWHERE = "nbd+unix:///?socket=/nonexistent/blockdrv-test.sock"


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
    ({"stream_factory": "unix.sock"}, "stream_factory must be an async callable"),
])
async def test_a_bad_argument_is_named(options, named):
    with trio.fail_after(10), pytest.raises(InvalidArgumentError, match=named) as caught:
        async with open_nbd(NOWHERE, **options):
            pass
    assert isinstance(caught.value, ValueError)  # `except ValueError` keeps working
    assert caught.value.errno == 22


def test_connection_settings_are_checked_once_when_built():
    """The frozen settings object is where the checks live: the layers below it
    (NBDDevice, the connection worker) take it as it is."""
    from blockdrv.nbd.settings import ConnectionSettings

    settings = ConnectionSettings(reconnect_delay=5, max_in_flight=4)
    assert settings.reconnect_delay == 5 and settings.connect_timeout == 30.0
    with pytest.raises(AttributeError):
        settings.reconnect_delay = -1  # type: ignore[misc]
    with pytest.raises(InvalidArgumentError, match="max_in_flight must be at least 1"):
        ConnectionSettings(max_in_flight=0)


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
        async with open_nbd(NOWHERE):
            pass


async def test_open_timeout_uses_a_server_that_appears_later(autojump_clock):
    with trio.fail_after(60):
        async with serving(disk()) as srv:
            srv.up = False

            async def appear():
                await trio.sleep(1)
                srv.up = True

            srv.nursery.start_soon(appear)
            start = trio.current_time()
            async with open_nbd(URI, stream_factory=srv.connect, open_timeout=5,
                                retry_initial=0.25, retry_max=0.25) as dev:
                assert 1 <= trio.current_time() - start <= 1.5
                assert dev.size == 8 * MiB


@pytest.mark.parametrize("open_timeout", [0, 1])
async def test_open_without_a_server_fails_with_the_real_error(open_timeout, autojump_clock):
    with trio.fail_after(60):
        async with serving(disk()) as srv:
            srv.up = False
            start = trio.current_time()
            with pytest.raises(ConnectError) as excinfo:
                async with open_nbd(URI, stream_factory=srv.connect,
                                    open_timeout=open_timeout, retry_initial=0.25):
                    pass
            elapsed = trio.current_time() - start
            assert "Connection refused" in str(excinfo.value)
            assert excinfo.value.errno == errno.ECONNREFUSED
            if open_timeout:
                assert 1 <= elapsed <= 1.1 and "within 1s" in str(excinfo.value)
            else:
                assert elapsed < 0.01


async def test_open_a_missing_unix_socket_names_the_path(tmp_path):
    path = tmp_path / "nobody-home.sock"
    with trio.fail_after(10):
        with pytest.raises(ConnectError) as excinfo:
            async with open_nbd(f"nbd+unix:///?socket={path}"):
                pass
    assert str(path) in str(excinfo.value)
    assert "No such file or directory" in str(excinfo.value)


async def test_no_exception_group_escapes_open_nbd():
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            srv = InProcessServer(nursery, disk())
            with pytest.raises(KeyError):  # not an ExceptionGroup around it
                async with open_nbd(URI, stream_factory=srv.connect):
                    raise KeyError("from the body")
            srv.kill()
            with pytest.raises(ConnectError):
                async with open_nbd(URI, stream_factory=srv.connect):
                    pass
            nursery.cancel_scope.cancel()
