"""Keeping ExceptionGroups inside: the public API raises one exception, as itself."""

from __future__ import annotations

import trio


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The first real failure of a task group (the others were cancelled by it)."""
    failures = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    first = (failures or list(group.exceptions))[0]
    return first_failure(first) if isinstance(first, BaseExceptionGroup) else first
