"""A whole-process deadline for tests that block outside trio (threads, asyncio): a hang
dumps every thread's traceback and ends the process instead of eating CI time."""

from __future__ import annotations

import faulthandler
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def process_deadline(seconds: float) -> Iterator[None]:
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
