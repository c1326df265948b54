"""click parameter types shared by the ``blockdrv`` and ``blockdrv-fuzz`` commands."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, TypeVar

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

F = TypeVar("F", bound=Callable[..., Any])


def option_group(name: str, cls: type, *options: Callable[[F], F]) -> Callable[[F], F]:
    """``options`` (click options, in help order) whose values reach the command as one
    ``cls(**values)`` in its parameter ``name``: the fields of the dataclass ``cls`` are
    the options' parameter names, so a command with forty options takes a handful of
    objects, each of which says what its values are for."""
    fields = [field.name for field in dataclasses.fields(cls)]

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def grouped(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = cls(**{field: kwargs.pop(field) for field in fields})
            return command(*args, **kwargs)

        for option in reversed(options):
            grouped = option(grouped)
        return grouped  # type: ignore[return-value]

    return decorate
