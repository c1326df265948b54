"""The ``blockdrv`` command.

Subcommands live here as thin click wrappers; the work is done by the library
(``blockdrv.tools``).  Errors the user can act on (a bad size, a file that cannot be
opened, a refused connection) are printed as one line on stderr with a non-zero exit
status, never as a traceback.  SIGINT cancels what a command is doing (its connections
are closed on the way out) and ends it with one line and exit status 130, as nbdcopy.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import click
import trio

from .. import __version__
from ..util.params import SIZE

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
    (a :class:`~blockdrv.tools.opening.ClientOptions`)."""

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
@click.version_option(__version__, prog_name="blockdrv")
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
def main(verbose: int) -> None:
    """blockdrv: an NBD client block driver and the tools around it."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="blockdrv: %(levelname)s: %(message)s",
                        stream=sys.stderr)


@main.command()
@click.option("--memory", "memory", type=SIZE, help="Serve a sparse in-memory disk.")
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="Serve a file (sparse-aware).")
@click.option("--upstream", metavar="URI",
              help="Proxy: serve this NBD export through the reconnecting driver "
                   "(size, flags, block sizes and metadata contexts mirrored).")
@click.option("--size", type=SIZE, help="With --file: create/resize the file to SIZE.")
@click.option("--export", "export_name", default="", show_default=True,
              help="Export name.")
@click.option("--description", default="", help="Export description.")
@click.option("--unix", "unix", type=click.Path(), help="Listen on this Unix socket.")
@click.option("--bind", default="127.0.0.1", show_default=True, help="TCP address.")
@click.option("--port", type=click.IntRange(0, 65535),
              help="TCP port (0 picks a free one; default 10809).")
@click.option("--read-only", is_flag=True, help="Refuse writes.")
@click.option("--no-multi-conn", is_flag=True, help="Do not advertise CAN_MULTI_CONN.")
@click.option("--tls", "tls_mode", type=click.Choice(["off", "allow", "require"]),
              help="TLS: require (FORCEDTLS: nothing but STARTTLS before TLS) or allow "
                   "(the client chooses). Default: require when --tls-cert is given.")
@_file_option("--tls-cert", "Server certificate (PEM).")
@_file_option("--tls-key", "Server private key (PEM; default: in the certificate file).")
@_file_option("--tls-ca", "Require client certificates signed by this CA.")
@click.option("--max-payload", type=SIZE, default="32M", show_default=True,
              help="Largest READ/WRITE accepted (advertised as the maximum block size; "
                   "--upstream: the upstream's).")
@click.option("--min-block", type=SIZE, default="1", show_default=True,
              help="Minimum block size (alignment) advertised and enforced "
                   "(--upstream: the upstream's).")
@click.option("--reconnect-delay", type=click.FloatRange(0), default=30.0,
              show_default=True, metavar="S",
              help="--upstream: when the upstream connection is lost, requests wait up "
                   "to S seconds for a reconnect (and are sent again) instead of failing.")
@click.option("--connections", type=click.IntRange(1), default=4, show_default=True,
              help="--upstream: connections to the upstream (when it offers multi-conn).")
@click.option("--upstream-requests", type=click.IntRange(1, 1024), default=64,
              show_default=True,
              help="--upstream: requests in flight on each upstream connection.")
@click.option("--open-timeout", type=click.FloatRange(0), default=0.0, metavar="S",
              help="--upstream: keep trying to reach the upstream at start for up to S "
                   "seconds (default: one attempt).")
@click.option("--connect-timeout", type=click.FloatRange(0, min_open=True), default=30.0,
              show_default=True, metavar="S",
              help="--upstream: give up on one connection attempt after S seconds.")
@click.option("--upstream-tls", type=click.Choice(["off", "allow", "require"]),
              help="--upstream: TLS to the upstream (nbds:// URIs require it).")
@_file_option("--upstream-tls-ca", "--upstream: CA certificate to verify the upstream with.")
@_file_option("--upstream-tls-cert", "--upstream: client certificate (PEM).")
@_file_option("--upstream-tls-key", "--upstream: client private key (PEM).")
@click.option("--max-connections", type=click.IntRange(1), default=128, show_default=True,
              help="Connections served at once; more are closed as soon as accepted.")
@click.option("--handshake-timeout", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True,
              help="Seconds a client may take to enter transmission (TLS included).")
@click.option("--shutdown-timeout", type=click.FloatRange(0), default=5.0,
              show_default=True,
              help="Seconds SIGTERM/SIGINT lets connections finish their requests.")
@click.option("--buffer-budget", type=SIZE, default="64M", show_default=True,
              help="Bytes one connection may make the server hold (WRITE payloads, "
                   "replies not yet sent); reading its requests pauses beyond it.")
@click.option("--socket-buffer", type=SIZE, default="2M", show_default=True,
              help="Send/receive buffer of each connection's socket (0: the system's).")
@click.option("--shuffle-replies", is_flag=True,
              help="Send replies in a deliberately shuffled order (tests clients).")
@click.option("--no-structured", is_flag=True, help="Refuse structured replies.")
@click.option("--no-extended", is_flag=True, help="Refuse extended headers.")
@click.option("--seed", type=int, help="Seed for shuffling and fault rates.")
@click.option("--fail", "fail_rules", multiple=True, metavar="KIND:ERRNO:RATE",
              help="Fault hook: fail KIND requests (read, write, zero, trim, flush, "
                   "cache, block-status, all) with ERRNO (EIO, ENOSPC, ...) at RATE.")
@click.option("--lose-writes", type=click.FloatRange(0, 1), default=0.0,
              help="Fault hook: acknowledge writes without storing them, at this rate.")
@click.option("--stale-reads", type=click.FloatRange(0, 1), default=0.0,
              help="Fault hook: serve reads from data older than the latest writes.")
@click.option("--crash-after", type=click.IntRange(1), metavar="N",
              help="Fault hook: kill this server process (SIGKILL, as a crash) when the "
                   "Nth request arrives.")
@click.option("--flood", type=click.FloatRange(0, 1), default=0.0,
              help="Hostile mode: answer GO, INFO, LIST, meta context options, READ and "
                   "BLOCK_STATUS with an endless stream, at this rate.")
@click.option("--tiny-chunks", type=click.FloatRange(0, 1), default=0.0,
              help="Hostile mode: cut READ replies into tiny chunks in a random order, "
                   "at this rate.")
@click.option("--tiny-chunk-max", type=SIZE, default="512", show_default=True,
              help="Largest tiny chunk (the smallest is 1 byte).")
@click.option("--unrequested-context", type=click.FloatRange(0, 1), default=0.0,
              help="Hostile mode: answer SET_META_CONTEXT with qemu:evil too, at this rate.")
@click.option("--slowloris", type=click.FloatRange(0, 1), default=0.0,
              help="Hostile mode: trickle option and request replies a few bytes at a "
                   "time, at this rate.")
@click.option("--slowloris-piece", type=SIZE, default="8", show_default=True,
              help="Largest piece slowloris sends at once.")
@click.option("--slowloris-delay", type=click.FloatRange(0), default=0.01,
              show_default=True, help="Seconds between slowloris pieces.")
@one_line_errors
@click.pass_context
def serve(ctx: click.Context, memory: int | None, path: str | None, upstream: str | None,
          size: int | None, export_name: str, description: str, unix: str | None,
          bind: str, port: int | None, read_only: bool, no_multi_conn: bool,
          tls_mode: str | None, tls_cert: str | None, tls_key: str | None,
          tls_ca: str | None, max_payload: int, min_block: int, reconnect_delay: float,
          connections: int, upstream_requests: int, open_timeout: float,
          connect_timeout: float, upstream_tls: str | None, upstream_tls_ca: str | None,
          upstream_tls_cert: str | None, upstream_tls_key: str | None,
          max_connections: int, handshake_timeout: float, shutdown_timeout: float,
          buffer_budget: int, socket_buffer: int, shuffle_replies: bool,
          no_structured: bool, no_extended: bool,
          seed: int | None, fail_rules: tuple[str, ...],
          lose_writes: float, stale_reads: float, crash_after: int | None,
          flood: float, tiny_chunks: float,
          tiny_chunk_max: int, unrequested_context: float, slowloris: float,
          slowloris_piece: int, slowloris_delay: float) -> None:
    """Serve one export over NBD until SIGINT/SIGTERM.

    The export is a sparse in-memory disk (--memory), a file (--file), or another NBD
    export (--upstream: a proxy whose clients ride through upstream restarts).

    Prints the export's NBD URI on the first line of stdout once listening. Without
    --unix or --port it uses sockets from systemd socket activation if any, else
    127.0.0.1:10809.
    """
    from ..server import Export, FileBackend, MemoryBackend, NBDServer
    from ..server.run import serve_until_signalled

    if sum(source is not None for source in (memory, path, upstream)) != 1:
        raise click.UsageError("give exactly one of --memory SIZE, --file PATH or "
                               "--upstream URI")
    if unix is not None and port is not None:
        raise click.UsageError("--unix and --port cannot be used together")
    given = [f"--{name.replace('_', '-')}" for name in
             (("size", "max_payload", "min_block") if upstream else
              ("reconnect_delay", "connections", "upstream_requests", "open_timeout",
               "connect_timeout", "upstream_tls", "upstream_tls_ca", "upstream_tls_cert",
               "upstream_tls_key"))
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be used "
                               f"{'with' if upstream else 'without'} --upstream")

    def configure(export: Export) -> NBDServer:
        """The fault hooks asked for on ``export``, and the server."""
        export.faults.rng.seed(seed)
        for spec in fail_rules:
            kind, code, rate = _fail_spec(spec)
            export.faults.fail(kind, errno=code, rate=rate)
        if lose_writes:
            export.faults.lose_writes(lose_writes)
        if stale_reads:
            export.faults.stale_reads(stale_reads)
        if crash_after:
            export.faults.crash_after(crash_after,
                                      lambda: os.kill(os.getpid(), signal.SIGKILL))
        if flood:
            export.faults.flood(rate=flood)
        if tiny_chunks:
            export.faults.tiny_chunks(tiny_chunk_max, rate=tiny_chunks)
        if unrequested_context:
            export.faults.unrequested_context(rate=unrequested_context)
        if slowloris:
            export.faults.slowloris(slowloris_piece, slowloris_delay, rate=slowloris)
        return NBDServer(export, structured=not no_structured, extended=not no_extended,
                         shuffle_replies=shuffle_replies, seed=seed,
                         tls=_server_tls(tls_mode, tls_cert, tls_key, tls_ca),
                         max_connections=max_connections,
                         handshake_timeout=handshake_timeout,
                         shutdown_timeout=shutdown_timeout, buffer_budget=buffer_budget,
                         socket_buffer_size=socket_buffer or None)

    def announce(uri: str) -> None:
        print(uri, flush=True)

    serving = functools.partial(serve_until_signalled, unix=unix, bind=bind, port=port,
                                announce=announce)
    if upstream is not None:
        from ..nbd.opening import ClientOptions
        from ..server.upstream import UpstreamOptions

        tls = {"tls": upstream_tls, "ca": upstream_tls_ca, "cert": upstream_tls_cert,
               "key": upstream_tls_key}
        options = UpstreamOptions(
            client=ClientOptions(reconnect_delay=reconnect_delay, open_timeout=open_timeout,
                                 connect_timeout=connect_timeout),
            connections=connections, max_in_flight=upstream_requests,
            tls={name: value for name, value in tls.items() if value is not None})
        trio.run(functools.partial(_serve_upstream, upstream, options, configure, serving,
                                   export_name, description=description,
                                   read_only=read_only, multi_conn=not no_multi_conn))
        return
    if path is not None:
        try:
            backend: Any = FileBackend(path, size=size, read_only=read_only,
                                       create=size is not None)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    else:
        assert memory is not None
        backend = MemoryBackend(memory)
    server = configure(Export(export_name, backend, read_only=read_only,
                              description=description, min_block=min_block,
                              max_payload=max_payload, multi_conn=not no_multi_conn))
    try:
        trio.run(functools.partial(serving, server))
    finally:
        server.close()


async def _serve_upstream(uri: str, options: Any, configure: Callable[[Any], Any],
                          serving: Callable[[Any], Awaitable[None]], name: str,
                          **export_args: Any) -> None:
    """``serve --upstream``: open the upstream, serve its mirror until a signal."""
    from ..server.node_backend import node_export
    from ..server.upstream import open_upstream

    async with open_upstream(uri, options) as node:
        await serving(configure(node_export(name, node, **export_args)))


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
        click.echo(json.dumps(summary, indent=2))
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




@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nbdinfo's fields).")
@click.option("--size", "size_only", is_flag=True,
              help="Print only the export's size in bytes.")
@click.option("--can", metavar="FEATURE",
              help="Print nothing; exit 0 if the export can FEATURE, 2 if not (e.g. "
                   "connect, read, write, flush, fua, trim, zero, fast-zero, cache, df, "
                   "multi-conn, structured-reply, tls).")
@click.option("--is", "is_", metavar="FEATURE",
              help="The same as --can (read-only, rotational, tls, ...).")
@click.option("--connections", type=click.IntRange(1, 64), default=1,
              help="Try multi-conn with this many connections (shown in the output).")
@client_options
@one_line_errors
def info(uri: str, as_json: bool, size_only: bool, can: str | None, is_: str | None,
         connections: int, options: ClientOptions) -> None:
    """What the server says about an export (like nbdinfo)."""
    import json

    from ..nbd.opening import address_of, open_device
    from .describe import export_lines, feature_test, protocol_fields, protocol_line

    if can and is_:
        raise click.UsageError("give --can or --is, not both")
    feature = can or is_
    test = feature_test(feature) if feature else None
    address = address_of(uri)

    async def query() -> tuple[Any, int, str, list[str]]:
        async with open_device(address, options, connections=connections) as dev:
            got = dev.info, dev.connections, dev.connections_note
        listed = [] if size_only or test else await _contexts(address, options)
        return (*got, listed)

    export_info, used, note, listed = run(query)
    if test is not None:
        sys.exit(0 if test(export_info) else 2)
    if size_only:
        click.echo(export_info.size)
        return
    fields = _export_fields(export_info, address, listed)
    if connections > 1:
        fields["connections"] = used
        if note:
            fields["note"] = note
    if as_json:
        click.echo(json.dumps({**protocol_fields(export_info), "exports": [fields]},
                              indent=2))
        return
    click.echo(protocol_line(export_info))
    click.echo("\n".join(export_lines(fields)))


def _export_fields(export_info: Any, address: Any, listed: list[str],
                   description: str | None = None) -> dict[str, Any]:
    from dataclasses import replace

    from .describe import export_fields

    return export_fields(export_info, uri=str(replace(address, export=export_info.name)),
                         contexts=set(export_info.contexts) | set(listed),
                         description=description)


async def _contexts(address: Any, options: ClientOptions) -> list[str]:
    """Every metadata context the export lists (as nbdinfo shows them); [] when the
    server will not say."""
    from ..nbd.opening import ClientOptions, ask
    from ..nbd.query import list_meta_contexts

    try:
        return await ask(functools.partial(list_meta_contexts, address), address,
                         ClientOptions(connect_timeout=options.connect_timeout))
    except OSError:
        return []


@main.command(name="list")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nbdinfo's fields).")
@client_options
@one_line_errors
def list_command(uri: str, as_json: bool, options: ClientOptions) -> None:
    """The exports a server lists, each with its details (like nbdinfo --list).

    The export name in URI is ignored.
    """
    import json
    from dataclasses import replace

    from ..nbd.opening import address_of, ask, open_device
    from ..nbd.query import list_exports
    from .describe import export_lines, protocol_fields, protocol_line

    address = address_of(uri)

    async def query() -> tuple[Any, list[dict[str, Any]], list[str]]:
        entries = await ask(functools.partial(list_exports, address), address, options)
        first, exports, failures = None, [], []
        for entry in entries:
            one = replace(address, export=entry.name)
            try:
                async with open_device(one, options) as dev:
                    export_info = dev.info
            except OSError as exc:
                failures.append(_one_line(exc))
                continue
            first = first or export_info
            exports.append(_export_fields(export_info, one, await _contexts(one, options),
                                          description=entry.description))
        return first, exports, failures

    first, exports, failures = run(query)
    if as_json:
        head = protocol_fields(first) if first is not None else {}
        click.echo(json.dumps({**head, "exports": exports}, indent=2))
    else:
        if first is not None:
            click.echo(protocol_line(first))
        for fields in exports:
            click.echo("\n".join(export_lines(fields)))
    if failures:
        raise click.ClickException("; ".join(failures))


@main.command(name="map")
@click.argument("uri")
@click.option("--context", default="base:allocation", show_default=True,
              help="Metadata context, e.g. qemu:dirty-bitmap:NAME or qemu:allocation-depth.")
@click.option("--totals", is_flag=True,
              help="Bytes and percentage of each extent type instead of the extents.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nbdinfo --map's form).")
@client_options
@one_line_errors
def map_command(uri: str, context: str, totals: bool, as_json: bool,
                options: ClientOptions) -> None:
    """Extents of an export (merged runs of equal flags), like nbdinfo --map."""
    import json

    from ..copy.extents import describe_flags, map_extents
    from ..copy.extents import totals as sum_types
    from ..nbd.opening import address_of, open_device
    from .describe import extent_line, total_json, total_line

    address = address_of(uri)

    async def query() -> tuple[list[Any], int]:
        async with open_device(address, options, meta_contexts=[context]) as dev:
            if context in dev.info.contexts:
                return [extent async for extent in map_extents(dev, context=context)], \
                    dev.size
        offered = sorted(await _contexts(address, options))
        raise ValueError(f"{address.display} does not offer the context {context!r}"
                         + (f" (it offers: {', '.join(offered)})" if offered else ""))

    extents, size = run(query)
    if totals:
        sums = [(total, describe_flags(context, total.type))
                for total in sum_types(extents, size)]
        if as_json:
            click.echo(json.dumps([total_json(t, d) for t, d in sums], indent=2))
        else:
            click.echo("\n".join(total_line(t, d) for t, d in sums))
        return
    described = [(e, describe_flags(context, e.flags)) for e in extents]
    if as_json:
        click.echo(json.dumps([
            {"offset": e.offset, "length": e.length, "type": e.flags,
             **({"description": d} if d is not None else {})} for e, d in described],
            indent=2))
        return
    click.echo("\n".join(extent_line(e.offset, e.length, e.flags, d) for e, d in described))


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


def _server_tls(mode: str | None, cert: str | None, key: str | None,
                ca: str | None) -> Any:
    from ..io.tls import NO_TLS, TLSMode, TLSSettings, server_context

    if mode is None and (key or ca) and not cert:
        raise click.UsageError("--tls-key/--tls-ca given without --tls-cert")
    if mode is None:
        mode = "require" if cert else "off"
    if mode == "off":
        if cert or key or ca:
            raise click.UsageError("--tls off with TLS certificates given")
        return NO_TLS
    if cert is None:
        raise click.UsageError(f"--tls {mode} needs --tls-cert (and --tls-key)")
    return TLSSettings(TLSMode(mode), server_context(cert=cert, key=key, ca=ca))


def _fail_spec(spec: str) -> tuple[str | None, int, float]:
    """``KIND:ERRNO:RATE`` of ``serve --fail`` (KIND ``all`` means every command)."""
    import errno as errno_module

    parts = spec.split(":")
    if len(parts) != 3:
        raise ValueError(f"--fail wants KIND:ERRNO:RATE, not {spec!r}")
    kind, name, rate_text = parts
    code = getattr(errno_module, name.upper(), None)
    if not isinstance(code, int):
        raise ValueError(f"unknown errno {name!r} in --fail {spec!r}")
    try:
        rate = float(rate_text)
    except ValueError:
        raise ValueError(f"bad rate {rate_text!r} in --fail {spec!r}") from None
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be within [0, 1] in --fail {spec!r}")
    return (None if kind == "all" else kind), code, rate


if __name__ == "__main__":  # pragma: no cover
    main()
