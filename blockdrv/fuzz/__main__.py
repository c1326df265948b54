"""``python -m blockdrv.fuzz`` runs ``blockdrv-fuzz``."""

from .cli import main

main()
