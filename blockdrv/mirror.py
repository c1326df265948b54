"""parameters_of: one signature for every flavour of ``open_nbd``.

``blockdrv.sync.open_nbd`` and ``blockdrv.aio.open_nbd`` take exactly the arguments of
:func:`blockdrv.open_nbd` and hand them on.  Rather than repeating twenty parameters
(and letting the copies drift), they are written as ``(target, **options)`` and
decorated with :func:`parameters_of`, which gives them the model's parameters for type
checkers (a ``ParamSpec``) and for ``help()``/``inspect.signature``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def parameters_of(model: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """Declare that the decorated function takes exactly ``model``'s parameters."""
    def apply(function: Callable[..., R]) -> Callable[P, R]:
        returns = inspect.signature(function).return_annotation
        function.__signature__ = inspect.signature(model).replace(  # type: ignore[attr-defined]
            return_annotation=returns)
        return function

    return apply
