"""The ``blockdrv`` command.

Subcommands live here as thin click wrappers; the work is done by the library.  Errors
the user can act on (a bad size, a file that cannot be opened, a refused connection) are
printed as one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Any, Callable, Iterator, TypeVar

import click
import trio

from . import __version__
from .units import parse_size

F = TypeVar("F", bound=Callable[..., Any])


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


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror  # blockdrv's errors carry their whole message here
    return str(exc)


def one_line_errors(func: F) -> F:
    """Turn OSError/ValueError from the library into a one-line click error."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (OSError, ValueError) as exc:
            raise click.ClickException(_one_line(exc)) from None

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
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="Server private key (PEM; default: in the certificate file).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="Require client certificates signed by this CA.")
@click.option("--max-payload", type=SIZE, default="32M", show_default=True,
              help="Largest READ/WRITE accepted (advertised as the maximum block size).")
@click.option("--min-block", type=SIZE, default="1", show_default=True,
              help="Minimum block size (alignment) advertised and enforced.")
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
def serve(memory: int | None, path: str | None, size: int | None, export_name: str,
          description: str, unix: str | None, bind: str, port: int | None, read_only: bool,
          no_multi_conn: bool, tls_mode: str | None, tls_cert: str | None,
          tls_key: str | None, tls_ca: str | None, max_payload: int, min_block: int,
          max_connections: int, handshake_timeout: float, shutdown_timeout: float,
          buffer_budget: int, socket_buffer: int, shuffle_replies: bool,
          no_structured: bool, no_extended: bool,
          seed: int | None, fail_rules: tuple[str, ...],
          lose_writes: float, stale_reads: float, flood: float, tiny_chunks: float,
          tiny_chunk_max: int, unrequested_context: float, slowloris: float,
          slowloris_piece: int, slowloris_delay: float) -> None:
    """Serve one export over NBD until SIGINT/SIGTERM.

    Prints the export's NBD URI on the first line of stdout once listening. Without
    --unix or --port it uses sockets from systemd socket activation if any, else
    127.0.0.1:10809.
    """
    from .server import Export, FileBackend, MemoryBackend, NBDServer
    from .server.run import serve_until_signalled

    if (memory is None) == (path is None):
        raise click.UsageError("give exactly one of --memory SIZE or --file PATH")
    if unix is not None and port is not None:
        raise click.UsageError("--unix and --port cannot be used together")
    if path is not None:
        try:
            backend: Any = FileBackend(path, size=size, read_only=read_only,
                                       create=size is not None)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
    else:
        assert memory is not None
        backend = MemoryBackend(memory)
    export = Export(export_name, backend, read_only=read_only, description=description,
                    min_block=min_block, max_payload=max_payload,
                    multi_conn=not no_multi_conn)
    export.faults.rng.seed(seed)
    for spec in fail_rules:
        kind, code, rate = _fail_spec(spec)
        export.faults.fail(kind, errno=code, rate=rate)
    if lose_writes:
        export.faults.lose_writes(lose_writes)
    if stale_reads:
        export.faults.stale_reads(stale_reads)
    if flood:
        export.faults.flood(rate=flood)
    if tiny_chunks:
        export.faults.tiny_chunks(tiny_chunk_max, rate=tiny_chunks)
    if unrequested_context:
        export.faults.unrequested_context(rate=unrequested_context)
    if slowloris:
        export.faults.slowloris(slowloris_piece, slowloris_delay, rate=slowloris)
    server = NBDServer(export, structured=not no_structured, extended=not no_extended,
                       shuffle_replies=shuffle_replies, seed=seed,
                       tls=_server_tls(tls_mode, tls_cert, tls_key, tls_ca),
                       max_connections=max_connections,
                       handshake_timeout=handshake_timeout,
                       shutdown_timeout=shutdown_timeout, buffer_budget=buffer_budget,
                       socket_buffer_size=socket_buffer or None)

    def announce(uri: str) -> None:
        print(uri, flush=True)

    try:
        trio.run(functools.partial(serve_until_signalled, server, unix=unix, bind=bind,
                                   port=port, announce=announce))
    finally:
        server.close()


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
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@one_line_errors
def bench(uri: str, pattern: str, request_size: int, depth: int, duration: float,
          count: int | None, span: int | None, socket_buffer: int | None, drains: int,
          as_json: bool) -> None:
    """A quick fio-like run: IOPS, MiB/s and latency percentiles.

    Requests are sequential (wrapping at the end of the export or of --span).  The
    write and mixed patterns overwrite the export.
    """
    import json

    from .benchmark import run_bench
    from .nbd import open_nbd

    async def run() -> dict[str, Any]:
        async with open_nbd(uri, max_in_flight=max(depth, 16),
                            socket_buffer_size=socket_buffer) as dev:
            result = await run_bench(dev, pattern=pattern, request_size=request_size,
                                     depth=depth, count=count,
                                     duration=None if count else duration, span=span,
                                     drains=drains)
        return result.summary()

    summary = trio.run(run)
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


def _uri_for(address: Any, export: str) -> str:
    from dataclasses import replace

    return str(replace(address, export=export))


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nbdinfo's field names).")
@click.option("--connections", type=click.IntRange(1, 64), default=1,
              help="Try multi-conn with this many connections (shown in the output).")
@one_line_errors
def info(uri: str, as_json: bool, connections: int) -> None:
    """What the server says about an export (like nbdinfo)."""
    import json

    from .nbd import open_nbd
    from .nbd.query import list_meta_contexts
    from .protocol.errors import NBDError
    from .protocol.uri import parse_uri
    from .units import format_size

    address = parse_uri(uri)

    async def run() -> tuple[dict[str, Any], str]:
        async with open_nbd(address, connections=connections) as dev:
            described = dev.info.describe()
            note = dev.connections_note
            used = dev.connections
        try:  # everything the server can list, as nbdinfo shows
            listed = await list_meta_contexts(address)
        except (NBDError, OSError):
            listed = []
        described["contexts"] = sorted(set(described["contexts"]) | set(listed))  # type: ignore[call-overload]
        described["connections"] = used
        return described, note

    described, note = trio.run(run)
    export = {key: value for key, value in described.items()
              if key not in ("protocol", "TLS", "structured", "extended")}
    export["uri"] = _uri_for(address, str(described["export-name"]))
    export["export-size-str"] = format_size(int(described["export-size"]))
    export = {key: value for key, value in export.items() if value is not None}
    if as_json:
        click.echo(json.dumps({"protocol": described["protocol"], "TLS": described["TLS"],
                               "structured": described["structured"],
                               "extended": described["extended"],
                               "exports": [export]}, indent=2))
        return
    features = [f"{'with' if described['TLS'] else 'without'} TLS"]
    if described["extended"]:
        features.append("using extended packets")
    elif described["structured"]:
        features.append("using structured packets")
    click.echo(f"protocol: {described['protocol']} {', '.join(features)}")
    click.echo(f"export={json.dumps(export.pop('export-name'))}:")
    size_str = export.pop("export-size-str")
    click.echo(f"\texport-size: {export.pop('export-size')} ({size_str})")
    for key, value in export.items():
        if key == "contexts":
            click.echo("\tcontexts:")
            for name in value:
                click.echo(f"\t\t{name}")
        elif isinstance(value, bool):
            click.echo(f"\t{key}: {str(value).lower()}")
        else:
            click.echo(f"\t{key}: {value}")
    if note:
        click.echo(f"\tnote: {note}")


@main.command(name="list")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@one_line_errors
def list_command(uri: str, as_json: bool) -> None:
    """The exports a server lists (NBD_OPT_LIST)."""
    import json

    from .nbd.query import list_exports
    from .protocol.uri import parse_uri

    address = parse_uri(uri)
    exports = trio.run(list_exports, address)
    if as_json:
        click.echo(json.dumps([{"export-name": e.name, "description": e.description,
                                "uri": _uri_for(address, e.name)} for e in exports],
                              indent=2))
        return
    for entry in exports:
        line = f"export={json.dumps(entry.name)}"
        if entry.description:
            line += f" description={json.dumps(entry.description)}"
        click.echo(line)


@main.command(name="map")
@click.argument("uri")
@click.option("--context", default="base:allocation", show_default=True,
              help="Metadata context, e.g. qemu:dirty-bitmap:NAME or qemu:allocation-depth.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (nbdinfo --map's form).")
@one_line_errors
def map_command(uri: str, context: str, as_json: bool) -> None:
    """Extents of an export (merged runs of equal flags), like nbdinfo --map."""
    import json

    from .nbd import open_nbd
    from .tools.extents import describe_flags, map_extents

    async def run() -> list[Any]:
        async with open_nbd(uri, meta_contexts=[context]) as dev:
            if context not in dev.info.contexts:
                raise ValueError(f"the server does not offer the context {context!r}")
            return [extent async for extent in map_extents(dev, context=context)]

    extents = trio.run(run)
    if as_json:
        click.echo(json.dumps([{"offset": e.offset, "length": e.length, "type": e.flags,
                                "description": describe_flags(context, e.flags)}
                               for e in extents], indent=2))
        return
    for e in extents:
        click.echo(f"{e.offset:>10} {e.length:>10} {e.flags:>4}  "
                   f"{describe_flags(context, e.flags)}")


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[int], None]]:
    """A transient byte progress bar on stderr; yields the function that advances it."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress("[progress.description]{task.description}", BarColumn(),
                  DownloadColumn(binary_units=True), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("copying", total=total)
        yield lambda n: bar.advance(task, n)


@main.command(name="copy")
@click.argument("source")
@click.argument("destination")
@click.option("--connections", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Connections per NBD side (multi-conn, when the server offers it).")
@click.option("--requests", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="Requests in flight.")
@click.option("--request-size", type=SIZE, default="256K", show_default=True,
              help="Bytes per read/write request.")
@click.option("--flush", is_flag=True, help="Flush the destination at the end.")
@click.option("--destination-is-zero", is_flag=True,
              help="The destination reads as zeroes already: skip zeroing holes.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@one_line_errors
def copy_command(source: str, destination: str, connections: int, requests: int,
                 request_size: int, flush: bool, destination_is_zero: bool,
                 quiet: bool) -> None:
    """Copy SOURCE to DESTINATION, sparse-aware (like nbdcopy).

    Each is an NBD URI, a local file or (destination only) null:.  Holes and zero
    ranges of the source are not written: the destination gets WRITE_ZEROES, or nothing
    when it is a new file.  A local destination file is created or truncated.
    """
    from .tools.copy import copy
    from .tools.endpoints import open_endpoint

    show = not quiet and sys.stderr.isatty()

    async def run() -> Any:
        async with open_endpoint(source, destination=False, connections=connections,
                                 requests=requests) as src, \
                open_endpoint(destination, destination=True, size=src.size,
                              connections=connections, requests=requests,
                              source=src) as dst:
            with contextlib.ExitStack() as stack:
                progress = stack.enter_context(progress_bar(src.size)) if show else None
                return await copy(src, dst, requests=requests, request_size=request_size,
                                  flush=flush, destination_is_zero=destination_is_zero,
                                  progress=progress)

    result = trio.run(run)
    if not quiet:
        click.echo(f"copied {result.size} bytes ({result.data_bytes} data, "
                   f"{result.zero_bytes} zero) in {result.seconds:.2f} s, "
                   f"{result.mib_s:.1f} MiB/s", err=True)


def _server_tls(mode: str | None, cert: str | None, key: str | None,
                ca: str | None) -> Any:
    from .tls import NO_TLS, TLSMode, TLSSettings, server_context

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
