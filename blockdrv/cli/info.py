"""The ``blockdrv info`` subcommand (nbdinfo's output and options)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

from .main import client_options, export_fields_of, main, meta_contexts_of, one_line_errors, run


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

    from ..nbd.open import address_of
    from ..nbd.opening import open_device
    from .describe import export_lines, feature_test, protocol_fields, protocol_line

    if can and is_:
        raise click.UsageError("give --can or --is, not both")
    feature = can or is_
    test = feature_test(feature) if feature else None
    address = address_of(uri)

    async def query() -> tuple[Any, int, str, list[str]]:
        async with open_device(address, options, connections=connections) as dev:
            got = dev.info, dev.connections, dev.connections_note
        listed = [] if size_only or test else await meta_contexts_of(address, options)
        return (*got, listed)

    export_info, used, note, listed = run(query)
    if test is not None:
        sys.exit(0 if test(export_info) else 2)
    if size_only:
        click.echo(export_info.size)
        return
    fields = export_fields_of(export_info, address, listed)
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
