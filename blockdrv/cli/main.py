"""The ``blockdrv`` command.

This module holds the group and what the subcommands share; each subcommand is a
module of its own (``info``, ``list``, ``map``, ``copy``, ``bench``, ``serve``), a thin
click wrapper over the library (``blockdrv.copy``, ``blockdrv.nbd``, ``blockdrv.bench``,
``blockdrv.server``).  Errors the user can act on (a bad size, a file that cannot be
opened, a refused connection) are printed as one line on stderr with a non-zero exit
status, never as a traceback.  SIGINT cancels what a command is doing (its connections
are closed on the way out) and ends it with one line and exit status 130, as nbdcopy.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import click
import trio

from .. import __version__
from ..util import core

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")




def _file_option(flag: str, help: str) -> Callable[[F], F]:
    """An option naming an existing file (certificates, keys)."""
    return click.option(flag, type=click.Path(exists=True, dir_okay=False), help=help)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror  # blockdrv's errors carry their whole message here
    return str(exc)


class Interrupted(Exception):
    """The command was interrupted (SIGINT); the message says what that left behind."""


def one_line_errors(func: F) -> F:
    """Turn OSError/ValueError from the library into a one-line click error (exit 1),
    and an interrupt into one line and exit status 130 (as nbdcopy)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (OSError, ValueError) as exc:
            raise click.ClickException(_one_line(exc)) from None
        except (Interrupted, KeyboardInterrupt) as exc:
            detail = str(exc) if isinstance(exc, Interrupted) else ""
            click.echo(f"Interrupted{': ' + detail if detail else ''}", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """``trio.run(fn)``, where SIGINT cancels ``fn`` (its cleanup runs) and raises
    :class:`Interrupted`; a failure comes out as itself, never in an ExceptionGroup."""
    from ..util.taskgroups import first_failure

    interrupted = False

    async def on_interrupt(scope: trio.CancelScope, signals: AsyncIterator[int]) -> None:
        nonlocal interrupted
        async for _ in signals:
            interrupted = True
            scope.cancel()
            return

    async def guarded() -> T:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(on_interrupt, nursery.cancel_scope, signals)
                    result = await fn()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                if interrupted:
                    raise Interrupted() from None
                raise first_failure(group) from None
        if interrupted:
            raise Interrupted()
        return result

    return trio.run(guarded)


def client_options(func: F) -> F:
    """The options every client command takes, passed on as ``options``
    (a :class:`~blockdrv.nbd.opening.ClientOptions`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, reconnect_delay: float, open_timeout: float,
                connect_timeout: float, **kwargs: Any) -> Any:
        from ..nbd.opening import ClientOptions

        options = ClientOptions(reconnect_delay=reconnect_delay, open_timeout=open_timeout,
                                connect_timeout=connect_timeout)
        return func(*args, options=options, **kwargs)

    seconds = click.FloatRange(min=0)
    for option in reversed([
        click.option("--reconnect-delay", type=seconds, default=0.0, metavar="S",
                     help="When the connection is lost, requests wait up to S seconds "
                          "for a reconnect (and are sent again) instead of failing."),
        click.option("--open-timeout", type=seconds, default=0.0, metavar="S",
                     help="Keep trying to connect for up to S seconds (default: one "
                          "attempt)."),
        click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=30.0, show_default=True, metavar="S",
                     help="Give up on one connection attempt (connect and handshake) "
                          "after S seconds."),
    ]):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blockdrv",
                      message=f"%(prog)s, version %(version)s\ncore: {core.in_use()}")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
def main(verbose: int) -> None:
    """blockdrv: an NBD client block driver and the tools around it."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="blockdrv: %(levelname)s: %(message)s",
                        stream=sys.stderr)


def export_fields_of(export_info: Any, address: Any, listed: list[str],
                   description: str | None = None) -> dict[str, Any]:
    from dataclasses import replace

    from .describe import export_fields

    return export_fields(export_info, uri=str(replace(address, export=export_info.name)),
                         contexts=set(export_info.contexts) | set(listed),
                         description=description)


async def meta_contexts_of(address: Any, options: ClientOptions) -> list[str]:
    """Every metadata context the export lists (as nbdinfo shows them); [] when the
    server will not say."""
    from ..nbd.opening import ClientOptions, ask
    from ..nbd.query import list_meta_contexts

    try:
        return await ask(functools.partial(list_meta_contexts, address), address,
                         ClientOptions(connect_timeout=options.connect_timeout))
    except OSError:
        return []
