"""Keeping ExceptionGroups inside: the public API raises one exception, as itself."""

from __future__ import annotations

from typing import NoReturn

import trio


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The first real failure of a task group (the others were cancelled by it)."""
    failures = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    first = (failures or list(group.exceptions))[0]
    return first_failure(first) if isinstance(first, BaseExceptionGroup) else first


def reraise_alone(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the only exception of ``group`` as itself, keeping its cause and context."""
    exc = group.exceptions[0]
    saved = exc.__cause__, exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = saved
