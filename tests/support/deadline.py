"""A whole-process deadline for tests that block outside trio (threads, asyncio): a hang
dumps every thread's traceback and ends the process instead of eating CI time."""

from __future__ import annotations

import faulthandler
from contextlib import contextmanager
from typing import Any, Iterator

import pytest


@contextmanager
def process_deadline(seconds: float) -> Iterator[None]:
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def deadline_fixture(seconds: float) -> Any:
    """An autouse fixture putting every test of a module under ``process_deadline``:
    ``deadline = deadline_fixture(60)`` at module level."""

    @pytest.fixture(autouse=True)
    def deadline() -> Iterator[None]:
        with process_deadline(seconds):
            yield

    return deadline
