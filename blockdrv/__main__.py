"""``python -m blockdrv`` runs the ``blockdrv`` command."""

from .cli import main

main()
