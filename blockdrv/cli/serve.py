"""The ``blockdrv serve`` subcommand: the embedded NBD server (memory, file, or a
reconnecting proxy of an upstream export).

Its forty-odd options come in groups, each a small frozen object (:class:`ExportArgs`,
:class:`ListenArgs`, :class:`TLSArgs`, :class:`UpstreamArgs`, :class:`ServerArgs`,
:class:`FaultArgs`) that knows what its values are for, so ``serve`` itself only picks
the source and puts the pieces together.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import click
import trio

from ..util.params import SIZE, option_group
from .main import _file_option, main, one_line_errors


@dataclass(frozen=True)
class ExportArgs:
    """What the export is called and offers."""

    export_name: str
    description: str
    read_only: bool
    no_multi_conn: bool
    max_payload: int
    min_block: int


@dataclass(frozen=True)
class ListenArgs:
    """Where the server listens."""

    unix: str | None
    bind: str
    port: int | None


@dataclass(frozen=True)
class TLSArgs:
    """The server's TLS."""

    tls_mode: str | None
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None

    def settings(self) -> Any:
        """The server's TLSSettings; UsageError for a combination that makes no sense."""
        from ..io.tls import NO_TLS, TLSMode, TLSSettings, server_context

        mode, cert, key, ca = self.tls_mode, self.tls_cert, self.tls_key, self.tls_ca
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


@dataclass(frozen=True)
class UpstreamArgs:
    """How the proxy (``--upstream``) reaches its upstream."""

    reconnect_delay: float
    connections: int
    upstream_requests: int
    open_timeout: float
    connect_timeout: float
    upstream_tls: str | None
    upstream_tls_ca: str | None
    upstream_tls_cert: str | None
    upstream_tls_key: str | None

    def options(self) -> Any:
        """The proxy's UpstreamOptions."""
        from ..nbd.opening import ClientOptions
        from ..server.upstream import UpstreamOptions

        tls = {"tls": self.upstream_tls, "ca": self.upstream_tls_ca,
               "cert": self.upstream_tls_cert, "key": self.upstream_tls_key}
        return UpstreamOptions(
            client=ClientOptions(reconnect_delay=self.reconnect_delay,
                                 open_timeout=self.open_timeout,
                                 connect_timeout=self.connect_timeout),
            connections=self.connections, max_in_flight=self.upstream_requests,
            tls={name: value for name, value in tls.items() if value is not None})


@dataclass(frozen=True)
class ServerArgs:
    """How the server treats its connections."""

    max_connections: int
    handshake_timeout: float
    shutdown_timeout: float
    buffer_budget: int
    socket_buffer: int
    shuffle_replies: bool
    no_structured: bool
    no_extended: bool
    seed: int | None


@dataclass(frozen=True)
class FaultArgs:
    """Fault hooks and hostile modes (for testing clients)."""

    fail_rules: tuple[str, ...]
    lose_writes: float
    stale_reads: float
    crash_after: int | None
    flood: float
    tiny_chunks: float
    tiny_chunk_max: int
    unrequested_context: float
    slowloris: float
    slowloris_piece: int
    slowloris_delay: float

    def apply(self, export: Any, seed: int | None) -> None:
        """Set up the hooks asked for on ``export``."""
        faults = export.faults
        faults.rng.seed(seed)
        for spec in self.fail_rules:
            kind, code, rate = _fail_spec(spec)
            faults.fail(kind, errno=code, rate=rate)
        if self.lose_writes:
            faults.lose_writes(self.lose_writes)
        if self.stale_reads:
            faults.stale_reads(self.stale_reads)
        if self.crash_after:
            faults.crash_after(self.crash_after,
                               lambda: os.kill(os.getpid(), signal.SIGKILL))
        if self.flood:
            faults.flood(rate=self.flood)
        if self.tiny_chunks:
            faults.tiny_chunks(self.tiny_chunk_max, rate=self.tiny_chunks)
        if self.unrequested_context:
            faults.unrequested_context(rate=self.unrequested_context)
        if self.slowloris:
            faults.slowloris(self.slowloris_piece, self.slowloris_delay,
                             rate=self.slowloris)


def _rate_option(flag: str, help: str) -> Callable[[Any], Any]:
    """A fault hook's or hostile mode's rate: the fraction of requests it acts on."""
    return click.option(flag, type=click.FloatRange(0, 1), default=0.0, help=help)


@main.command()
@click.option("--memory", "memory", type=SIZE, help="Serve a sparse in-memory disk.")
@click.option("--file", "path", type=click.Path(dir_okay=False),
              help="Serve a file (sparse-aware).")
@click.option("--upstream", metavar="URI",
              help="Proxy: serve this NBD export through the reconnecting driver "
                   "(size, flags, block sizes and metadata contexts mirrored).")
@click.option("--size", type=SIZE, help="With --file: create/resize the file to SIZE.")
@option_group(
    "exported", ExportArgs,
    click.option("--export", "export_name", default="", show_default=True,
                 help="Export name."),
    click.option("--description", default="", help="Export description."),
    click.option("--read-only", is_flag=True, help="Refuse writes."),
    click.option("--no-multi-conn", is_flag=True, help="Do not advertise CAN_MULTI_CONN."),
    click.option("--max-payload", type=SIZE, default="32M", show_default=True,
                 help="Largest READ/WRITE accepted (advertised as the maximum block "
                      "size; --upstream: the upstream's)."),
    click.option("--min-block", type=SIZE, default="1", show_default=True,
                 help="Minimum block size (alignment) advertised and enforced "
                      "(--upstream: the upstream's)."))
@option_group(
    "listen", ListenArgs,
    click.option("--unix", "unix", type=click.Path(), help="Listen on this Unix socket."),
    click.option("--bind", default="127.0.0.1", show_default=True, help="TCP address."),
    click.option("--port", type=click.IntRange(0, 65535),
                 help="TCP port (0 picks a free one; default 10809)."))
@option_group(
    "tls", TLSArgs,
    click.option("--tls", "tls_mode", type=click.Choice(["off", "allow", "require"]),
                 help="TLS: require (FORCEDTLS: nothing but STARTTLS before TLS) or allow "
                      "(the client chooses). Default: require when --tls-cert is given."),
    _file_option("--tls-cert", "Server certificate (PEM)."),
    _file_option("--tls-key", "Server private key (PEM; default: in the certificate "
                              "file)."),
    _file_option("--tls-ca", "Require client certificates signed by this CA."))
@option_group(
    "upstream_args", UpstreamArgs,
    click.option("--reconnect-delay", type=click.FloatRange(0), default=30.0,
                 show_default=True, metavar="S",
                 help="--upstream: when the upstream connection is lost, requests wait up "
                      "to S seconds for a reconnect (and are sent again) instead of "
                      "failing."),
    click.option("--connections", type=click.IntRange(1), default=4, show_default=True,
                 help="--upstream: connections to the upstream (when it offers "
                      "multi-conn)."),
    click.option("--upstream-requests", type=click.IntRange(1, 1024), default=64,
                 show_default=True,
                 help="--upstream: requests in flight on each upstream connection."),
    click.option("--open-timeout", type=click.FloatRange(0), default=0.0, metavar="S",
                 help="--upstream: keep trying to reach the upstream at start for up to "
                      "S seconds (default: one attempt)."),
    click.option("--connect-timeout", type=click.FloatRange(0, min_open=True),
                 default=30.0, show_default=True, metavar="S",
                 help="--upstream: give up on one connection attempt after S seconds."),
    click.option("--upstream-tls", type=click.Choice(["off", "allow", "require"]),
                 help="--upstream: TLS to the upstream (nbds:// URIs require it)."),
    _file_option("--upstream-tls-ca",
                 "--upstream: CA certificate to verify the upstream with."),
    _file_option("--upstream-tls-cert", "--upstream: client certificate (PEM)."),
    _file_option("--upstream-tls-key", "--upstream: client private key (PEM)."))
@option_group(
    "server_args", ServerArgs,
    click.option("--max-connections", type=click.IntRange(1), default=128,
                 show_default=True,
                 help="Connections served at once; more are closed as soon as accepted."),
    click.option("--handshake-timeout", type=click.FloatRange(0, min_open=True),
                 default=10.0, show_default=True,
                 help="Seconds a client may take to enter transmission (TLS included)."),
    click.option("--shutdown-timeout", type=click.FloatRange(0), default=5.0,
                 show_default=True,
                 help="Seconds SIGTERM/SIGINT lets connections finish their requests."),
    click.option("--buffer-budget", type=SIZE, default="64M", show_default=True,
                 help="Bytes one connection may make the server hold (WRITE payloads, "
                      "replies not yet sent); reading its requests pauses beyond it."),
    click.option("--socket-buffer", type=SIZE, default="2M", show_default=True,
                 help="Send/receive buffer of each connection's socket (0: the "
                      "system's)."),
    click.option("--shuffle-replies", is_flag=True,
                 help="Send replies in a deliberately shuffled order (tests clients)."),
    click.option("--no-structured", is_flag=True, help="Refuse structured replies."),
    click.option("--no-extended", is_flag=True, help="Refuse extended headers."),
    click.option("--seed", type=int, help="Seed for shuffling and fault rates."))
@option_group(
    "faults", FaultArgs,
    click.option("--fail", "fail_rules", multiple=True, metavar="KIND:ERRNO:RATE",
                 help="Fault hook: fail KIND requests (read, write, zero, trim, flush, "
                      "cache, block-status, all) with ERRNO (EIO, ENOSPC, ...) at RATE."),
    _rate_option("--lose-writes",
                 "Fault hook: acknowledge writes without storing them, at this rate."),
    _rate_option("--stale-reads",
                 "Fault hook: serve reads from data older than the latest writes."),
    click.option("--crash-after", type=click.IntRange(1), metavar="N",
                 help="Fault hook: kill this server process (SIGKILL, as a crash) when "
                      "the Nth request arrives."),
    _rate_option("--flood",
                 "Hostile mode: answer GO, INFO, LIST, meta context options, READ and "
                 "BLOCK_STATUS with an endless stream, at this rate."),
    _rate_option("--tiny-chunks",
                 "Hostile mode: cut READ replies into tiny chunks in a random order, at "
                 "this rate."),
    click.option("--tiny-chunk-max", type=SIZE, default="512", show_default=True,
                 help="Largest tiny chunk (the smallest is 1 byte)."),
    _rate_option("--unrequested-context",
                 "Hostile mode: answer SET_META_CONTEXT with qemu:evil too, at this rate."),
    _rate_option("--slowloris",
                 "Hostile mode: trickle option and request replies a few bytes at a time, "
                 "at this rate."),
    click.option("--slowloris-piece", type=SIZE, default="8", show_default=True,
                 help="Largest piece slowloris sends at once."),
    click.option("--slowloris-delay", type=click.FloatRange(0), default=0.01,
                 show_default=True, help="Seconds between slowloris pieces."))
@one_line_errors
@click.pass_context
def serve(ctx: click.Context, memory: int | None, path: str | None, upstream: str | None,
          size: int | None, exported: ExportArgs, listen: ListenArgs, tls: TLSArgs,
          upstream_args: UpstreamArgs, server_args: ServerArgs,
          faults: FaultArgs) -> None:
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
    if listen.unix is not None and listen.port is not None:
        raise click.UsageError("--unix and --port cannot be used together")
    proxy_only = [field.name for field in dataclasses.fields(UpstreamArgs)]
    given = [f"--{name.replace('_', '-')}" for name in
             (("size", "max_payload", "min_block") if upstream else proxy_only)
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be used "
                               f"{'with' if upstream else 'without'} --upstream")
    server_tls = tls.settings()

    def configure(export: Export) -> NBDServer:
        """The fault hooks asked for on ``export``, and the server."""
        faults.apply(export, server_args.seed)
        s = server_args
        return NBDServer(export, structured=not s.no_structured,
                         extended=not s.no_extended, shuffle_replies=s.shuffle_replies,
                         seed=s.seed, tls=server_tls, max_connections=s.max_connections,
                         handshake_timeout=s.handshake_timeout,
                         shutdown_timeout=s.shutdown_timeout,
                         buffer_budget=s.buffer_budget,
                         socket_buffer_size=s.socket_buffer or None)

    def announce(uri: str) -> None:
        print(uri, flush=True)

    serving = functools.partial(serve_until_signalled, unix=listen.unix, bind=listen.bind,
                                port=listen.port, announce=announce)
    name, read_only = exported.export_name, exported.read_only
    if upstream is not None:
        trio.run(functools.partial(_serve_upstream, upstream, upstream_args.options(),
                                   configure, serving, name,
                                   description=exported.description, read_only=read_only,
                                   multi_conn=not exported.no_multi_conn))
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
    server = configure(Export(name, backend, read_only=read_only,
                              description=exported.description,
                              min_block=exported.min_block,
                              max_payload=exported.max_payload,
                              multi_conn=not exported.no_multi_conn))
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
