"""The build of blockdrv's compiled core (see blockdrv/util/core.py and README,
"Performance"): mypyc compiles the per-request modules from their typed source.

Without a C compiler or mypyc the build warns once and installs the pure-Python
package, which is the same code run by the interpreter.  BLOCKDRV_PURE_PYTHON=1 at
build time skips the compiled core too.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CORE = [
    "blockdrv/protocol/constants.py",
    "blockdrv/protocol/wire.py",
    "blockdrv/protocol/replies.py",
    "blockdrv/nbd/dispatch.py",
    "blockdrv/nbd/locks.py",
    "blockdrv/util/count.py",
]  # the same modules as blockdrv.util.core.COMPILED (tests/project/test_core.py)


def compiled_core():
    if os.environ.get("BLOCKDRV_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify

        return mypycify(CORE, opt_level="3")
    except (Exception, SystemExit) as exc:  # no mypyc, or it failed: pure Python
        print(f"blockdrv: building without the compiled core ({exc}); "
              "the pure-Python core will be used", file=sys.stderr)
        return []


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure-Python core when compiling fails."""

    def run(self):
        try:
            super().run()
        except Exception as exc:
            self.extensions = []
            print(f"blockdrv: the compiled core did not build ({exc}); "
                  "the pure-Python core will be used", file=sys.stderr)


setup(ext_modules=compiled_core(), cmdclass={"build_ext": OptionalBuildExt})
