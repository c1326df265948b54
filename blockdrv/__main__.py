"""``python -m blockdrv`` runs the ``blockdrv`` command."""

from .cli.main import main

main()
