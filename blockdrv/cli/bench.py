"""The ``blockdrv bench`` subcommand: requests at a fixed depth against an export, with
latency figures."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..util.params import SIZE

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

from .main import client_options, main, one_line_errors, run


@main.command()
@click.argument("uri")
@click.option("--pattern", type=click.Choice(["read", "write", "mixed"]), default="read",
              show_default=True, help="mixed: half reads, half writes in flight together.")
@click.option("--size", "request_size", type=SIZE, default="4K", show_default=True,
              help="Request size.")
@click.option("--depth", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Requests in flight.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="Seconds to run (unless --count).")
@click.option("--count", type=click.IntRange(1), help="Run exactly this many requests.")
@click.option("--span", type=SIZE, help="Bytes of the export to cycle over (default all).")
@click.option("--socket-buffer", type=SIZE, help="SO_SNDBUF/SO_RCVBUF for the socket.")
@click.option("--drains", type=click.IntRange(0), default=0,
              help="Enter this many drained sections during the run and report how long "
                   "each took to quiesce the requests in flight.")
@click.option("--api", type=click.Choice(["trio", "asyncio"]), default="trio",
              show_default=True,
              help="Drive the requests through the trio API or blockdrv.aio (asyncio).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@client_options
@one_line_errors
def bench(uri: str, pattern: str, request_size: int, depth: int, duration: float,
          count: int | None, span: int | None, socket_buffer: int | None, drains: int,
          api: str, as_json: bool, options: ClientOptions) -> None:
    """A quick fio-like run: IOPS, MiB/s and latency percentiles.

    Requests are sequential (wrapping at the end of the export or of --span).  The
    write and mixed patterns overwrite the export.
    """
    import json

    from ..bench.engine import run_bench
    from ..nbd.opening import open_device

    async def bench_run() -> dict[str, Any]:
        async with open_device(uri, options, max_in_flight=max(depth, 16),
                               socket_buffer_size=socket_buffer) as dev:
            result = await run_bench(dev, pattern=pattern, request_size=request_size,
                                     depth=depth, count=count,
                                     duration=None if count else duration, span=span,
                                     drains=drains)
        return result.summary()

    async def bench_run_asyncio() -> dict[str, Any]:
        from ..aio import open_nbd as open_aio
        from ..bench.engine_aio import run_bench_aio

        async with open_aio(uri, **options.open_kwargs(), max_in_flight=max(depth, 16),
                            socket_buffer_size=socket_buffer) as dev:
            result = await run_bench_aio(dev, pattern=pattern, request_size=request_size,
                                         depth=depth, count=count,
                                         duration=None if count else duration, span=span)
        return result.summary()

    if api == "asyncio":
        if drains:
            raise click.UsageError("--drains is for --api trio only")
        import asyncio

        summary = asyncio.run(bench_run_asyncio())
    else:
        summary = run(bench_run)
    if as_json:
        from ..util.core import in_use

        click.echo(json.dumps({**summary, "core": in_use()}, indent=2))
        return
    us = 1e6
    click.echo(f"{pattern} {request_size} B, depth {depth}: {summary['ops']} requests in "
               f"{summary['seconds']:.2f} s")
    click.echo(f"  {summary['iops']:.0f} IOPS, {summary['mib_s']:.1f} MiB/s, "
               f"{summary['cpu_s_per_gib']:.2f} CPU s/GiB")
    click.echo(f"  latency p50 {summary['p50'] * us:.0f} us, p90 {summary['p90'] * us:.0f} us, "
               f"p99 {summary['p99'] * us:.0f} us, p99.9 {summary['p999'] * us:.0f} us, "
               f"max {summary['max'] * us:.0f} us")
    if drains and summary.get("drains"):
        click.echo(f"  drained sections: {summary['drains']}, time to quiesce p50 "
                   f"{summary['drain_p50'] * us:.0f} us, max {summary['drain_max'] * us:.0f} us")
    elif drains:
        click.echo("  drained sections: none (the run ended before the queue refilled)")
