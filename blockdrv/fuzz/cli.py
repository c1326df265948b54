"""The ``blockdrv-fuzz`` command: seeded fault-injection runs of the driver.

Exit status 0 only when no invariant was violated and the server never crashed; 1 when
an invariant was violated (a reproducer file is written, for ``--replay``); 3 when the
server died on its own (it is restarted and the run goes on; reproducer written too);
2 for bad arguments or a run that could not start.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..util.params import SIZE
from .config import ALL_FAULTS, SERVER_KINDS, FuzzConfig, parse_faults
from .records import FuzzResult, load_reproducer
from .runner import FuzzRun


def _table(result: FuzzResult) -> Table:
    summary = result.summary()
    table = Table(title=f"blockdrv-fuzz seed {summary['seed']} against {summary['server']}"
                        f" ({summary['elapsed']:.1f} s)", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("figures")

    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(mapping.items())) or "none"

    table.add_row("operations", f"{summary['ops_total']}: {counts(summary['ops_by_kind'])}")
    table.add_row("failed (explained)", counts(summary["failures_by_kind"]))
    table.add_row("faults injected", f"{summary['faults_injected']}: "
                                     f"{counts(summary['faults_by_kind'])}")
    table.add_row("reconnects", f"{summary['reconnects']} (device reopened "
                                f"{summary['reopens']}x after malformed replies; "
                                f"reconnect_delay outlasted by fault storms "
                                f"{summary['delay_expiries_explained']}x)")
    table.add_row("drains / graph changes", f"{summary['drains']} / "
                                            f"{summary['graph_changes']}")
    lat = summary["latency"]
    table.add_row("latency p50 / p99 / max",
                  f"{lat['p50'] * 1e3:.2f} / {lat['p99'] * 1e3:.2f} / {lat['max'] * 1e3:.1f} ms")
    table.add_row("workers / max_in_flight", f"{summary['concurrency']} / "
                                             f"{summary['max_in_flight']}")
    table.add_row("admission wait max / overtakes",
                  f"{summary['admission_wait_max_s'] * 1e3:.1f} ms / "
                  f"{summary['admission_overtakes']}")
    table.add_row("loop lag max / longest step", f"{summary['loop_lag_max_s'] * 1e3:.1f} ms / "
                                                 f"{summary['step_cpu_max_s'] * 1e3:.1f} ms CPU")
    table.add_row("memory peak / growth", f"{summary['rss_peak_mib']} MiB / "
                                          f"{summary['rss_growth_peak_mib']} MiB")
    table.add_row("violations", str(len(summary["violations"])),
                  style="red" if summary["violations"] else "green")
    return table


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--server", type=click.Choice(SERVER_KINDS), default="embedded",
              show_default=True, help="Server to run (on a temporary file).")
@click.option("--server-cmd", metavar="CMD",
              help="Run this server command instead; {socket} and {file} are filled in.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--duration", type=float, help="Seconds of workload (default 30).")
@click.option("--ops", type=int, help="Number of operations (instead of --duration).")
@click.option("--concurrency", type=click.IntRange(1, 1024),
              help="Workers (default: 4 x --max-in-flight, so admission has a queue).")
@click.option("--max-in-flight", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="The device's max_in_flight per connection.")
@click.option("--connections", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Open the device with this many connections (multi-conn).")
@click.option("--faults", "faults_text", default="default", show_default=True,
              help="Fault kinds, comma-separated: default, all, none, "
                   + ", ".join(ALL_FAULTS) + "; -KIND takes one out (default,-kill).")
@click.option("--fault-interval", type=click.FloatRange(0.01), default=1.0,
              show_default=True, help="Mean seconds between network faults.")
@click.option("--reconnect-delay", type=float, default=15.0, show_default=True)
@click.option("--size", type=SIZE, default="64M", show_default=True)
@click.option("--json", "json_file", type=click.Path(dir_okay=False),
              help="Write the figures as JSON here.")
@click.option("--reproducer", type=click.Path(dir_okay=False),
              help="Where to write the reproducer on a violation "
                   "(default: ./blockdrv-fuzz-SEED.json).")
@click.option("--replay", type=click.Path(exists=True, dir_okay=False),
              help="Run a reproducer again (its configuration and trace).")
@click.option("--quiet", is_flag=True, help="No progress bar and no table.")
def main(server: str, server_cmd: str | None, seed: int, duration: float | None,
         ops: int | None, concurrency: int | None, max_in_flight: int, connections: int,
         faults_text: str, fault_interval: float,
         reconnect_delay: float, size: int, json_file: str | None, reproducer: str | None,
         replay: str | None, quiet: bool) -> None:
    """Put the NBD driver through a seeded fault-injection run and check invariants."""
    if duration is not None and ops is not None:
        raise click.UsageError("give --duration or --ops, not both")
    trace = None
    try:
        if replay is not None:
            config, trace = load_reproducer(replay)
        else:
            config = FuzzConfig(server=server, server_cmd=server_cmd, seed=seed,
                                duration=duration, ops=ops, concurrency=concurrency,
                                max_in_flight=max_in_flight, connections=connections,
                                faults=parse_faults(faults_text),
                                fault_interval=fault_interval,
                                reconnect_delay=reconnect_delay, size=size)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    console = Console()
    show_progress = not quiet and sys.stdout.isatty()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
                  console=console, disable=not show_progress) as progress:
        by_ops = config.ops is not None
        task = progress.add_task("operations" if by_ops else "seconds",
                                 total=config.ops if by_ops else config.duration)

        def update(done: int, elapsed: float) -> None:
            progress.update(task, completed=done if by_ops else min(elapsed,
                                                                  config.duration or 0))

        run = FuzzRun(config, replay=trace, on_progress=update)
        try:
            result = trio.run(run.run)
        except (OSError, RuntimeError, trio.TooSlowError, ValueError) as exc:
            _could_not_run(exc)
    if not quiet:
        console.print(_table(result))
    for v in result.violations:
        click.echo(f"VIOLATION {v.operation}: expected {v.expected}; found {v.found}",
                   err=True)
    for crash in result.server_crashes:
        click.echo(f"SERVER CRASH (restarted): {crash}", err=True)
    if json_file:
        Path(json_file).write_text(json.dumps(result.summary(), indent=2))
    if result.violations or result.server_crashes:
        default = (f"{Path(replay).stem}.again.json" if replay
                   else f"blockdrv-fuzz-{config.seed}.json")  # never overwrite the input
        path = Path(reproducer or default)
        result.write_reproducer(path)
        click.echo(f"reproducer written to {path} (run it again with --replay {path})",
                   err=True)
        sys.exit(1 if result.violations else 3)


def _could_not_run(exc: BaseException) -> NoReturn:
    """The run could not start or went wrong outside the workload: exit status 2."""
    click.echo(f"Error: the run could not go on: {exc}", err=True)
    sys.exit(2)
