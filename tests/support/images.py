"""Image files with known content for the command-line tests."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from blockdrv.util.units import MiB


def patterned_image(path: Path, size: int, seed: int = 1) -> Path:
    """A sparse image: random data in some 1 MiB pieces, zeroes in some, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for at in range(0, size, MiB):
            roll = rng.random()
            if roll < 0.3:
                f.seek(at)
                f.write(rng.randbytes(MiB // 2))  # half a megabyte of data, then hole
            elif roll < 0.4:
                f.seek(at)
                f.write(bytes(MiB // 4))  # allocated zeroes
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
