"""Check an error's exact message (``strerror``), not a pattern it happens to contain."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest


@contextmanager
def raises_message(kind: type[OSError], message: str) -> Iterator[pytest.ExceptionInfo]:
    """Like ``pytest.raises(kind)``, and the error's message is exactly ``message``."""
    with pytest.raises(kind) as info:
        yield info
    assert info.value.strerror == message
