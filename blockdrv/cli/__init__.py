"""The ``blockdrv`` command (click): the group and shared options in
:mod:`blockdrv.cli.main`, one module per subcommand."""

from . import bench, copy, info, list, map, serve  # noqa: F401  (each registers its subcommand)
from .main import main

__all__ = ["main"]
