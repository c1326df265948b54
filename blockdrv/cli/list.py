"""The ``blockdrv list`` subcommand: the exports a server lists (nbdinfo --list)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

from .main import (
    _one_line,
    client_options,
    export_fields_of,
    main,
    meta_contexts_of,
    one_line_errors,
    run,
)


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

    from ..nbd.open import address_of
    from ..nbd.opening import ask, open_device
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
            exports.append(export_fields_of(export_info, one, await meta_contexts_of(one, options),
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
