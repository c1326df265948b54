"""parse_uri: the NBD URI spec's examples, aliases, and clear errors for bad URIs."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.errors import raises_message

from blockdrv import NBDAddress, parse_uri
from blockdrv.protocol.errors import InvalidArgumentError
from blockdrv.protocol.uri import is_nbd_uri


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
    with pytest.raises(ValueError, match="must be a string, not NoneType"):
        parse_uri(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a string, not int"):
        parse_uri(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("uri, message", [
    ("", "empty NBD URI"),
    ("nbd://h/a%00b", "export name contains a NUL character"),
    ("nbd:x://h/", "bad export path 'x://h/' in 'nbd:x://h/'"),
    ("nbd://h/" + "e" * 4097, "export name is longer than 4096 bytes"),
    ("nbd://h/x?tls-verify-peer",
     "malformed query string 'tls-verify-peer' in 'nbd://h/x?tls-verify-peer'"),
    ("nbd://h/x?bogus=", "unknown NBD URI query parameter 'bogus' in 'nbd://h/x?bogus='"),
    ("nbd://h/x?x-a=1&bogus=1",
     "unknown NBD URI query parameter 'bogus' in 'nbd://h/x?x-a=1&bogus=1'"),
    ("nb://h/", "unsupported URI scheme 'nb' in 'nb://h/' "
     "(use one of: nbd, nbd+tcp, nbd+unix, nbds, nbds+tcp, nbds+unix)"),
])
def test_bad_uris_get_the_whole_message(uri, message):
    with raises_message(InvalidArgumentError, message):
        parse_uri(uri)


def test_export_name_limit_is_inclusive():
    assert parse_uri("nbd://h/" + "e" * 4096).export == "e" * 4096


def test_export_name_must_be_utf8():
    with pytest.raises(ValueError):  # UnicodeDecodeError: not replaced with U+FFFD
        parse_uri("nbd://h/%ff")


def test_experimental_parameters_skip_only_themselves():
    assert parse_uri("nbd://h/x?x-a=1&tls-verify-peer=0").tls_verify_peer is False


@pytest.mark.parametrize("text, expected", [
    ("nbd://h/x", True),
    ("NBDS+Unix:///x?socket=/s", True),
    ("nbd://h:10810/x", True),
    ("/dev/nbd0", False),
    ("disk.img", False),
    ("http://h/x", False),
    ("c:nbd", False),
])
def test_is_nbd_uri_looks_at_the_scheme(text, expected):
    assert is_nbd_uri(text) is expected


@pytest.mark.parametrize("address, text", [
    (NBDAddress("tcp", host="h", port=10809), "nbd://h/"),
    (NBDAddress("tcp", "a b/c", host="h", port=10810, tls=True), "nbds://h:10810/a%20b%2Fc"),
    (NBDAddress("tcp", host="::1", port=10809), "nbd://[::1]/"),
    (NBDAddress("unix", "e", socket="/run/a b.sock"), "nbd+unix:///e?socket=/run/a%20b.sock"),
    (NBDAddress("unix", socket="/s", tls=True, tls_verify_peer=False),
     "nbds+unix:///?socket=/s&tls-verify-peer=0"),
    (NBDAddress("tcp", host="h", port=10809, tls=True, tls_hostname="a/b",
                tls_certificates="/etc/pki/nbd x"),
     "nbds://h/?tls-hostname=a%2Fb&tls-certificates=/etc/pki/nbd%20x"),
])
def test_str_is_the_short_uri(address, text):
    assert str(address) == text


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


@pytest.mark.parametrize("text, says", [
    ("nbd://[::1/x", "malformed NBD URI"),  # urlsplit: Invalid IPv6 URL
    ("nbd://host]/", "malformed NBD URI"),
    ("nbd://[zz]/x", "malformed NBD URI"),  # urlsplit checks bracketed hosts itself
    ("nbd://localhost/%ff", "not UTF-8 once percent-decoded"),
    ("nbd+unix:///a?socket=%ff", "malformed query string"),  # not a silent U+FFFD path
    ("nbd://h/x?tls-certificates=%C3", "malformed query string"),
])
def test_every_bad_uri_is_an_invalid_argument(text, says):
    with pytest.raises(InvalidArgumentError, match=says):
        parse_uri(text)


uri_like = st.builds(lambda scheme, rest: scheme + rest,
                     st.sampled_from(["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]),
                     st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
                     | st.from_regex(r"[\[\]%a-f0-9:/?=&@.]{0,40}", fullmatch=True))


@given(text=uri_like | st.text(max_size=40))
def test_parse_uri_answers_an_address_or_invalid_argument(text):
    """Whatever the text, the only failure is InvalidArgumentError (no ValueError from
    urllib, no UnicodeDecodeError)."""
    try:
        address = parse_uri(text)
    except InvalidArgumentError:
        return
    assert isinstance(address, NBDAddress)
