"""The embedded NBD server: memory and file backends, fault hooks, ``blockdrv serve``."""

from .backends import Backend, FileBackend, MemoryBackend
from .export import Export
from .faults import FailRule, Faults
from .server import NBDServer

__all__ = ["Backend", "Export", "FailRule", "Faults", "FileBackend", "MemoryBackend",
           "NBDServer"]
