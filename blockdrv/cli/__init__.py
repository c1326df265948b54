"""The ``blockdrv`` command (click): one module per subcommand, shared options in
:mod:`blockdrv.cli.main`."""

from .main import main

__all__ = ["main"]
