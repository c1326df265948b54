"""Record how concurrent requests ended, for tests that expect some to fail."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from blockdrv import ConnectionLostError


async def outcome(outcomes: list[str], call: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run ``call(*args)``; append "ok", or "failed" if it raised ConnectionLostError."""
    try:
        await call(*args)
        outcomes.append("ok")
    except ConnectionLostError:
        outcomes.append("failed")
