"""errors.py, the errno tables of constants.py and the NEED_DATA sentinel of events.py.

The cases a mutation of those modules (scripts/mutation) showed no test looked at.
"""

from __future__ import annotations

import errno
import os

import pytest

from blockdrv.protocol.constants import WireErrno, errno_from_wire, errno_to_wire
from blockdrv.protocol.errors import OptionError, RequestError, describe_errno
from blockdrv.protocol.events import NEED_DATA, _NeedData


def test_server_message_defaults_to_empty():
    assert RequestError("m", errno=errno.EIO).server_message == ""
    assert OptionError("m", errno=errno.EIO, option=7, reply_type=1).server_message == ""


def test_describe_errno_names_known_and_unknown_codes():
    assert describe_errno(errno.ENOSPC) == f"ENOSPC ({os.strerror(errno.ENOSPC)})"
    assert describe_errno(9999) == f"9999 ({os.strerror(9999)})"


@pytest.mark.parametrize("host, wire", [
    (errno.EIO, WireErrno.EIO),
    (errno.ENOSPC, WireErrno.ENOSPC),
    (errno.EDQUOT, WireErrno.ENOSPC),
    (errno.EROFS, WireErrno.EPERM),
    (errno.EOPNOTSUPP, WireErrno.ENOTSUP),
    (errno.ENOENT, WireErrno.EIO),  # unlisted: sent as EIO
    (9999, WireErrno.EIO),
])
def test_host_errnos_go_on_the_wire_as_nbd_errors(host, wire):
    assert errno_to_wire(host) is wire


def test_wire_errnos_come_back_as_host_errnos():
    assert errno_from_wire(WireErrno.ENOSPC) == errno.ENOSPC
    assert errno_from_wire(WireErrno.ESHUTDOWN) == errno.ESHUTDOWN
    assert errno_from_wire(2) == errno.EINVAL  # unknown on the wire: EINVAL (spec)


def test_need_data_is_one_sentinel_named_in_its_repr():
    assert _NeedData() is NEED_DATA
    assert repr(NEED_DATA) == "NEED_DATA"
