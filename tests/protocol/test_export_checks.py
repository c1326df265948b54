"""check_request: what a client must not send, refused before anything goes out."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from support.errors import raises_message

from blockdrv.protocol import ExportInfo, InvalidArgumentError, UnsupportedError
from blockdrv.protocol.constants import Command, CommandFlag
from blockdrv.protocol.constants import TransmissionFlag as T
from blockdrv.protocol.export import check_request, incompatibility

ALL = (T.HAS_FLAGS | T.SEND_FLUSH | T.SEND_FUA | T.SEND_TRIM | T.SEND_WRITE_ZEROES
       | T.SEND_DF | T.SEND_CACHE | T.SEND_FAST_ZERO)
FULL = ExportInfo("d", 1 << 30, ALL, 512, 4096, 1 << 20, structured=True,
                  contexts={"base:allocation": 1})
BARE = ExportInfo("d", 1 << 30, T.HAS_FLAGS)


def test_valid_requests_pass():
    check_request(FULL, Command.READ, 0, 1 << 20, CommandFlag.DF)
    check_request(FULL, Command.WRITE, 512, 512, CommandFlag.FUA)
    check_request(FULL, Command.WRITE_ZEROES, 0, 1 << 20,
                  CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO)
    check_request(FULL, Command.TRIM, 0, 1 << 30)
    check_request(FULL, Command.BLOCK_STATUS, 0, 1 << 30, CommandFlag.REQ_ONE)
    check_request(FULL, Command.FLUSH, 0, 0)
    check_request(BARE, Command.READ, 1, 3)  # no minimum block size advertised


@pytest.mark.parametrize("command, flags, what", [
    (Command.FLUSH, 0, "flush"),
    (Command.TRIM, 0, "trim"),
    (Command.WRITE_ZEROES, 0, "write zeroes"),
    (Command.CACHE, 0, "cache"),
    (Command.BLOCK_STATUS, 0, "meta"),
    (Command.WRITE, CommandFlag.FUA, "FUA"),
    (Command.READ, CommandFlag.DF, "DF"),
])
def test_unadvertised_commands_and_flags(command, flags, what):
    length = 0 if command == Command.FLUSH else 512
    with pytest.raises(UnsupportedError, match=what) as excinfo:
        check_request(BARE, command, 0, length, flags)
    assert excinfo.value.errno == errno.ENOTSUP


def test_flags_on_the_wrong_command():
    with pytest.raises(InvalidArgumentError, match="not valid"):
        check_request(FULL, Command.READ, 0, 512, CommandFlag.NO_HOLE)
    with pytest.raises(InvalidArgumentError, match="not valid"):
        check_request(FULL, Command.WRITE, 0, 512, CommandFlag.REQ_ONE)
    with pytest.raises(InvalidArgumentError, match="not valid"):  # no name, still refused
        check_request(FULL, Command.READ, 0, 512, 1 << 6)


def test_read_only_export_refuses_writes():
    ro = ExportInfo("d", 1 << 20, ALL | T.READ_ONLY)
    for command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
        with pytest.raises(UnsupportedError) as excinfo:
            check_request(ro, command, 0, 512)
        assert excinfo.value.errno == errno.EPERM
    check_request(ro, Command.READ, 0, 512)


@pytest.mark.parametrize("offset, length, what", [
    (1 << 30, 512, "beyond"),
    ((1 << 30) - 512, 1024, "beyond"),
    (100, 512, "multiples"),
    (0, 100, "multiples"),
    (0, 2 << 20, "over the limit"),
    (-512, 512, "negative"),
])
def test_ranges(offset, length, what):
    with pytest.raises(InvalidArgumentError, match=what) as excinfo:
        check_request(FULL, Command.READ, offset, length)
    assert excinfo.value.errno == errno.EINVAL
    assert isinstance(excinfo.value, ValueError)


def test_flush_has_no_range():
    with pytest.raises(InvalidArgumentError):
        check_request(FULL, Command.FLUSH, 512, 0)


def test_limits():
    assert BARE.max_payload == 32 << 20
    assert FULL.max_payload == 1 << 20
    assert FULL.max_length(Command.TRIM) == 0xFFFFFFFF - 511
    assert FULL.max_length(Command.WRITE_ZEROES) == 1 << 20
    assert FULL.max_length(Command.WRITE_ZEROES, CommandFlag.FAST_ZERO) == 0xFFFFFFFF - 511
    ext = ExportInfo("d", 1 << 40, ALL, extended=True, structured=True)
    assert ext.max_length(Command.TRIM) == 1 << 40


@pytest.mark.parametrize("info, command, flags", [
    (FULL, Command.READ, CommandFlag.DF),
    (FULL, Command.WRITE, CommandFlag.FUA),
    (FULL, Command.TRIM, 0),
    (FULL, Command.WRITE_ZEROES, CommandFlag.FAST_ZERO),
    (FULL, Command.BLOCK_STATUS, CommandFlag.REQ_ONE),
    (FULL, Command.CACHE, 0),
    (BARE, Command.READ, 0),
])
def test_an_empty_request_only_asks_whether_the_command_is_allowed(info, command, flags):
    # NBDDevice._pieces probes every (command, flags) pair with offset 0 and length 0.
    check_request(info, command, 0, 0, flags)


@pytest.mark.parametrize("info, command, offset, length, kind, message", [
    (FULL, 99, 0, 0, InvalidArgumentError, "unknown command 99"),
    (ExportInfo("d", 1 << 20, ALL | T.READ_ONLY), Command.TRIM, 0, 512, UnsupportedError,
     "TRIM: the export is read-only"),
    (ExportInfo("d", 1 << 20, ALL), Command.BLOCK_STATUS, 0, 512, UnsupportedError,
     "BLOCK_STATUS: no metadata context was negotiated"),
    (FULL, Command.RESIZE, 0, 512, UnsupportedError, "RESIZE is not supported"),
    (FULL, Command.FLUSH, 0, 512, InvalidArgumentError, "FLUSH: offset and length must be 0"),
])
def test_refusals_name_the_command(info, command, offset, length, kind, message):
    with raises_message(kind, message):
        check_request(info, command, offset, length)


def test_fast_zero_lifts_the_write_zeroes_limit_of_a_request():
    check_request(FULL, Command.WRITE_ZEROES, 0, 2 << 20, CommandFlag.FAST_ZERO)
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        check_request(FULL, Command.WRITE_ZEROES, 0, 2 << 20)


def test_an_empty_extended_export_still_has_a_positive_limit():
    empty = ExportInfo("d", 0, ALL, extended=True, structured=True)
    assert empty.max_length(Command.TRIM) == 1


def test_describe_uses_nbdinfo_names():
    assert FULL.describe() == {
        "export-name": "d", "description": None, "export-size": 1 << 30,
        "protocol": "newstyle-fixed", "TLS": False, "is_rotational": False,
        "is_read_only": False, "can_cache": True, "can_df": True, "can_fast_zero": True,
        "can_flush": True, "can_fua": True, "can_multi_conn": False, "can_trim": True,
        "can_zero": True, "block_size_minimum": 512, "block_size_preferred": 4096,
        "block_size_maximum": 1 << 20, "contexts": ["base:allocation"], "structured": True,
        "extended": False,
    }


# --- incompatibility: one rule for reconnects and multi-conn ------------------------------

@pytest.mark.parametrize("change, reason", [
    ({"size": 1 << 29}, f"size changed from {1 << 30} to {1 << 29}"),
    ({"flags": ALL & ~T.SEND_TRIM}, "can_trim is no longer offered"),
    ({"flags": ALL | T.READ_ONLY}, "the export became read-only"),
    ({"structured": False}, "structured replies are no longer offered"),
    ({"contexts": {}}, "meta contexts ['base:allocation'] are no longer offered"),
    ({"block_size_maximum": 1 << 16}, "block size constraints became stricter"),
    ({"tls": True}, "TLS use changed"),
])
def test_an_export_that_offers_less_cannot_stand_in(change, reason):
    old = dataclasses.replace(FULL, contexts={"base:allocation": 1})
    assert incompatibility(old, dataclasses.replace(old, **change)) == reason


def test_an_export_that_offers_as_much_or_more_can_stand_in():
    old = dataclasses.replace(BARE, contexts={"base:allocation": 1})
    assert incompatibility(old, old) is None
    more = dataclasses.replace(old, flags=ALL, structured=True,
                               contexts={"base:allocation": 1, "qemu:dirty-bitmap:b": 2})
    assert incompatibility(old, more) is None
