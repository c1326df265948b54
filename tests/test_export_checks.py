"""check_request: what a client must not send, refused before anything goes out."""

from __future__ import annotations

import errno

import pytest

from blockdrv.protocol import ExportInfo, InvalidArgumentError, UnsupportedError
from blockdrv.protocol.constants import Command, CommandFlag
from blockdrv.protocol.constants import TransmissionFlag as T
from blockdrv.protocol.export import check_request

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


def test_describe_uses_nbdinfo_names():
    d = FULL.describe()
    for key in ("export-size", "can_flush", "can_fua", "can_trim", "can_zero", "can_df",
                "can_cache", "can_fast_zero", "can_multi_conn", "is_read_only",
                "is_rotational", "block_size_minimum", "block_size_preferred",
                "block_size_maximum", "contexts", "protocol", "TLS"):
        assert key in d
    assert d["contexts"] == ["base:allocation"]
