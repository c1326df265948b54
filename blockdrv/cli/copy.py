"""The ``blockdrv copy`` subcommand: sparse-aware copy between exports, files and streams
(nbdcopy's options)."""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from ..util.params import SIZE

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

from .main import Interrupted, client_options, main, one_line_errors, run


class _ProgressFdAlias(click.Command):
    """nbdcopy spells the progress file descriptor ``--progress=FD``, while ``-p`` /
    ``--progress`` alone is the bar: ``--progress=FD`` is read as ``--progress-fd=FD``
    (an option with an optional value would take the next argument, SOURCE, as FD)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        args = [("--progress-fd=" + arg.split("=", 1)[1]
                 if i < end and arg.startswith("--progress=") else arg)
                for i, arg in enumerate(args)]
        return super().parse_args(ctx, args)


@main.command(name="copy", cls=_ProgressFdAlias)
@click.argument("source")
@click.argument("destination")
@click.option("-C", "--connections", type=click.IntRange(1, 64), default=4,
              show_default=True,
              help="Connections per NBD side (multi-conn, when the server offers it).")
@click.option("-R", "--requests", type=click.IntRange(1, 1024), default=16,
              show_default=True, help="Requests in flight.")
@click.option("--request-size", type=SIZE, default="1M", show_default=True,
              help="Bytes per read/write request.")
@click.option("--flush", is_flag=True, help="Flush the destination at the end.")
@click.option("--destination-is-zero", "--target-is-zero", "destination_is_zero",
              is_flag=True,
              help="The destination reads as zeroes already: skip zeroing holes.")
@click.option("--allocated", is_flag=True,
              help="Leave the destination fully allocated: zero ranges are written or "
                   "zeroed without punching holes.")
@click.option("--no-extents", is_flag=True,
              help="Do not ask the source where its holes are: read everything "
                   "(zeroes read are still not written).")
@click.option("-p", "--progress", is_flag=True,
              help="Show the progress bar even when stderr is not a terminal. "
                   "--progress=FD: write 'N/100' lines to file descriptor FD instead, "
                   "as nbdcopy does.")
@click.option("--progress-fd", type=click.IntRange(0), metavar="FD",
              help="The same as --progress=FD.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@client_options
@one_line_errors
def copy_command(source: str, destination: str, connections: int, requests: int,
                 request_size: int, flush: bool, destination_is_zero: bool,
                 allocated: bool, no_extents: bool, progress: bool,
                 progress_fd: int | None, quiet: bool, options: ClientOptions) -> None:
    """Copy SOURCE to DESTINATION, sparse-aware (like nbdcopy).

    Each is an NBD URI, a local file, - (standard input or output) or (destination
    only) null:.  Holes and zero ranges of the source are not written: the destination
    gets WRITE_ZEROES, or nothing when it is a new file.  A local destination file is
    created or truncated.
    """
    import contextlib

    from ..copy.copier import copy
    from ..copy.endpoints import open_endpoint
    from .progress import Progress, terminal_bar

    if destination == "-":  # a closed pipe ends the copy as it ends nbdcopy
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    show_bar = progress_fd is None and not quiet and (progress or sys.stderr.isatty())
    tracker: Progress | None = None

    async def copy_run() -> Any:
        nonlocal tracker
        async with open_endpoint(source, destination=False, connections=connections,
                                 requests=requests, options=options) as src:
            size = None if src.sequential else src.size
            async with open_endpoint(destination, destination=True, size=size,
                                     connections=connections, requests=requests,
                                     source=src, options=options) as dst:
                tracker = Progress(size)
                if progress_fd is not None:
                    tracker.to_fd(progress_fd)
                with contextlib.ExitStack() as stack:
                    if show_bar:
                        tracker.outputs.append(
                            stack.enter_context(terminal_bar(size, force=progress)))
                    result = await copy(src, dst, requests=requests,
                                        request_size=request_size, flush=flush,
                                        destination_is_zero=destination_is_zero,
                                        allocated=allocated, extents=not no_extents,
                                        progress=tracker)
                tracker.finish()
                return result

    try:
        result = run(copy_run)
    except Interrupted:
        where = _copy_destination(destination)
        if tracker is None:  # before the destination was opened
            raise Interrupted(f"nothing was copied to {where}") from None
        raise Interrupted(f"{where} is incomplete ({tracker.done} bytes copied)") from None
    if not quiet:
        click.echo(copy_summary(result), err=True)


def _copy_destination(spec: str) -> str:
    return {"-": "standard output", "null:": "null:"}.get(spec, spec)


def copy_summary(result: Any) -> str:
    """The line ``blockdrv copy`` ends with: the logical size and what moved."""
    from ..util.units import format_size

    line = (f"copied {result.size} bytes ({format_size(result.size)}) in "
            f"{result.seconds:.2f} s, {result.mib_s:.1f} MiB/s of logical size; "
            f"data moved: {format_size(result.read_bytes)} read")
    if result.data_bytes != result.read_bytes:
        line += f", {format_size(result.data_bytes)} written"
    line += f" ({result.data_mib_s:.1f} MiB/s)"
    if result.reconnects:
        line += (f"; {result.reconnects} reconnect"
                 f"{'s' if result.reconnects != 1 else ''}")
    return line
