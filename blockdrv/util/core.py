"""Which core runs the per-request path: the compiled modules, or their Python source.

Theory of operation
-------------------
The modules every request goes through (:data:`COMPILED`: the request and reply codec,
the reply cursor, the cookie/slot table and its hand-off, the locks, the port's counts)
are compiled by the package's build with mypyc, from the same strictly typed source
that stays beside them.  Python's import system prefers an extension module to the
``.py`` file of the same name, so an installation with a compiler runs the compiled
core and one without it (the build warns and skips) runs the source.

``BLOCKDRV_PURE_PYTHON=1`` forces the source even where the compiled modules exist:
:func:`select` (run when this module is imported, which ``blockdrv/__init__.py`` does
before anything else of ours) then puts a finder first on ``sys.meta_path`` that loads
exactly the modules of :data:`COMPILED` from their ``.py`` files.  :func:`in_use` says
which core the process runs ("compiled" or "pure Python"); ``blockdrv --version``,
``blockdrv bench --json`` and ``blockdrv-fuzz --json`` report it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Sequence

COMPILED = (
    "blockdrv.protocol.constants",
    "blockdrv.protocol.wire",
    "blockdrv.protocol.replies",
    "blockdrv.nbd.dispatch",
    "blockdrv.nbd.locks",
    "blockdrv.util.count",
)
"""The modules the build compiles (setup.py reads this list)."""

PURE_ENVIRONMENT = "BLOCKDRV_PURE_PYTHON"


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`COMPILED` as their ``.py`` source."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED or not path:
            return None
        source = os.path.join(path[0], fullname.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def pure_requested() -> bool:
    """``BLOCKDRV_PURE_PYTHON`` is set to something other than "", "0"."""
    return os.environ.get(PURE_ENVIRONMENT, "") not in ("", "0")


def select() -> None:
    """Put the source-first finder in place when the pure core is asked for (once)."""
    if pure_requested() and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst())


def in_use() -> str:
    """"compiled" when the per-request modules run compiled, else "pure Python"."""
    from . import count  # one of the compiled modules, in this layer

    compiled = importlib.machinery.EXTENSION_SUFFIXES
    return "compiled" if any(str(count.__file__).endswith(suffix)
                             for suffix in compiled) else "pure Python"


select()
