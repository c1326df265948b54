"""parse_uri: the NBD URI spec's examples, aliases, and clear errors for bad URIs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockdrv import NBDAddress, parse_uri


@pytest.mark.parametrize("uri, export", [
    ("nbd://example.com/disk", "disk"),
    ("nbd+unix:///disk?socket=sock", "disk"),
    ("nbd://example.com/", ""),
    ("nbd://example.com", ""),
    ("nbd://example.com//disk", "/disk"),
    ("nbd://example.com/hello%20world", "hello world"),
])
def test_spec_export_name_table(uri, export):
    assert parse_uri(uri).export == export


def test_tcp_defaults_and_fields():
    a = parse_uri("nbd://example.com/disk")
    assert (a.transport, a.host, a.port, a.socket, a.tls) == ("tcp", "example.com", 10809,
                                                              None, False)
    assert parse_uri("nbd://127.0.0.1:1234/").port == 1234
    assert parse_uri("nbds://h/").tls is True


def test_ipv6_literal():
    a = parse_uri("nbd://[::1]:10810/x")
    assert (a.host, a.port) == ("::1", 10810)
    assert a.display == "[::1]:10810"


def test_unix_schemes():
    a = parse_uri("nbd+unix:///e?socket=/tmp/s.sock")
    assert (a.transport, a.socket, a.export, a.tls, a.host) == ("unix", "/tmp/s.sock", "e",
                                                                False, None)
    assert parse_uri("nbds+unix:///?socket=/s").tls is True
    assert parse_uri("nbd+unix:///?socket=%00abstract").socket == "\0abstract"


def test_tcp_aliases():
    assert parse_uri("nbd+tcp://h/x") == parse_uri("nbd://h/x")
    assert parse_uri("nbds+tcp://h/x") == parse_uri("nbds://h/x")


def test_tls_parameters():
    a = parse_uri("nbds://h/x?tls-hostname=server.example&tls-verify-peer=0"
                  "&tls-certificates=/etc/pki/nbd&x-extra=ignored")
    assert a.tls_hostname == "server.example"
    assert a.tls_verify_peer is False
    assert a.tls_certificates == "/etc/pki/nbd"


@pytest.mark.parametrize("uri, problem", [
    ("", "empty"),
    ("/dev/nbd0", "not an NBD URI"),
    ("http://h/x", "unsupported URI scheme"),
    ("nbd+vsock://1/x", "unsupported URI scheme"),
    ("nbd:///x", "needs a host"),
    ("nbd://h:99999/x", "bad port"),
    ("nbd://h:abc/x", "bad port"),
    ("nbd://h:0/x", "port 0"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd+unix://host/x?socket=/s", "must not name a host"),
    ("nbd://h/x?socket=/s", "only for nbd+unix"),
    ("nbd://h/x?bogus=1", "unknown NBD URI query parameter 'bogus'"),
    ("nbd://h/x?tls-verify-peer=yes", "tls-verify-peer"),
    ("nbd://h/x?tls-type=psk", "tls-type"),
    ("nbd://user@h/x", "user information"),
    ("nbd://h/x#frag", "fragment"),
    ("nbd://h/a%00b", "NUL"),
    ("nbd://[zz::1]/x", "IPv6"),
    ("nbd://h/x?socket=/a&socket=/b", "socket"),
])
def test_bad_uris_name_the_problem(uri, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_uri(uri)


def test_non_string():
    with pytest.raises(ValueError, match="must be a string"):
        parse_uri(None)  # type: ignore[arg-type]


names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=30)


@given(export=names, port=st.integers(1, 65535), tls=st.booleans())
def test_str_round_trips_tcp(export, port, tls):
    a = NBDAddress(transport="tcp", host="example.org", port=port, export=export, tls=tls)
    assert parse_uri(str(a)) == a


@given(export=names, path=st.from_regex(r"/[a-z0-9_./-]{1,30}", fullmatch=True),
       tls=st.booleans())
def test_str_round_trips_unix(export, path, tls):
    a = NBDAddress(transport="unix", socket=path, export=export, tls=tls)
    assert parse_uri(str(a)) == a
