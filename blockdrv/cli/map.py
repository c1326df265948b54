"""The ``blockdrv map`` subcommand: an export's extents (nbdinfo --map)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..nbd.opening import ClientOptions

from .main import client_options, main, meta_contexts_of, one_line_errors, run


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
    from ..nbd.open import address_of
    from ..nbd.opening import open_device
    from .describe import extent_line, total_json, total_line

    address = address_of(uri)

    async def query() -> tuple[list[Any], int]:
        async with open_device(address, options, meta_contexts=[context]) as dev:
            if context in dev.info.contexts:
                return [extent async for extent in map_extents(dev, context=context)], \
                    dev.size
        offered = sorted(await meta_contexts_of(address, options))
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
