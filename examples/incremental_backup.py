"""Incremental backup: copy the ranges a qemu dirty bitmap marks into a local file.

Usage: python incremental_backup.py URI BITMAP BACKUP_FILE

The server exports the disk with the bitmap (``qemu-nbd -B BITMAP ...``, or a QMP
``block-export-add`` with ``bitmaps``).  BACKUP_FILE gets the disk's size; the dirty
ranges are written at their own offsets and the rest is left as holes, ready to be
laid over the previous full backup (``qemu-img rebase``/``commit``, or your own merge).
"""

import os
import sys

import trio

import blockdrv

CHUNK = 4 << 20  # bytes per read


async def incremental_backup(uri, bitmap, backup, progress=None):
    """Copy the dirty ranges of ``uri`` into ``backup``; returns [(offset, length)]."""
    dirty_context = f"qemu:dirty-bitmap:{bitmap}"
    async with blockdrv.open_nbd(uri, meta_contexts=[dirty_context],
                                 reconnect_delay=30) as dev:
        # Ask for the bitmap by name: its extents, not base:allocation's.
        dirty = [(r.offset, r.length)
                 async for r in dev.extents(contexts=[dirty_context]) if r.dirty]
        total, done = sum(length for _, length in dirty), 0
        buf = bytearray(CHUNK)
        with open(backup, "wb") as out:
            out.truncate(dev.size)
            for offset, length in dirty:
                for pos in range(offset, offset + length, CHUNK):
                    view = memoryview(buf)[:min(CHUNK, offset + length - pos)]
                    await dev.pread_into(view, pos)
                    os.pwrite(out.fileno(), view, pos)
                    done += len(view)
                    if progress:
                        progress(done, total)
    return dirty


def show_progress(done, total):
    print(f"\r{done} of {total} dirty bytes copied ({100 * done // total}%)",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    uri, bitmap, backup = sys.argv[1:]
    ranges = trio.run(incremental_backup, uri, bitmap, backup, show_progress)
    print(f"{len(ranges)} dirty ranges, {sum(n for _, n in ranges)} bytes -> {backup}")
