"""click parameter types shared by the ``blockdrv`` and ``blockdrv-fuzz`` commands."""

from __future__ import annotations

from typing import Any

import click

from .units import parse_size


class SizeType(click.ParamType):  # type: ignore[type-arg]
    """A byte count with an optional K/M/G/T suffix."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()
