"""Block status that cannot be misread: every context from one reply, one context only
when it is named (or the only one), windows a server can take, merged ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.inprocess import open_in_process
from support.peers import Nbdkit

from blockdrv import InvalidArgumentError, open_nbd
from blockdrv.block.node import BLOCK_STATUS_WINDOW, BlockNode, BlockRange, BlockStatus, Extent
from blockdrv.protocol.constants import BASE_ALLOCATION, StateFlag
from blockdrv.protocol.export import ExportInfo
from blockdrv.util.units import GiB

BITMAP = "qemu:dirty-bitmap:b0"


class Canned(BlockNode):
    """A node whose block status is given per context, for the merging logic."""

    def __init__(self, size: int, runs: BlockStatus) -> None:
        super().__init__()
        self._size, self.runs = size, runs
        self.asked: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def info(self) -> ExportInfo:
        return ExportInfo("", self._size, 1, contexts={name: i + 1 for i, name
                                                      in enumerate(self.runs)})

    async def _do_block_status(self, count: int, offset: int) -> BlockStatus:
        await trio.lowlevel.checkpoint()
        self.asked.append((offset, count))
        end = offset + count
        out: BlockStatus = {}
        for name, extents in self.runs.items():
            out[name] = [Extent(max(e.offset, offset), min(e.offset + e.length, end)
                                - max(e.offset, offset), e.flags)
                         for e in extents if e.offset < end and e.offset + e.length > offset]
        return out

    async def _do_pread_into(self, buf, offset, holes=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    _do_pwrite = _do_zero = _do_trim = _do_flush = _do_cache = _do_pread_into  # type: ignore[assignment]


def canned() -> Canned:
    return Canned(100, {
        BASE_ALLOCATION: [Extent(0, 40, 0), Extent(40, 60, StateFlag.HOLE | StateFlag.ZERO)],
        BITMAP: [Extent(0, 10, 0), Extent(10, 70, 1), Extent(80, 20, 0)],
    })


async def test_extents_merge_every_context_into_ranges():
    node = canned()
    ranges = [r async for r in node.extents()]
    assert [(r.offset, r.length, r.hole, r.zero, r.dirty) for r in ranges] == [
        (0, 10, False, False, False), (10, 30, False, False, True),
        (40, 40, True, True, True), (80, 20, True, True, False)]
    assert ranges[1].flags == {BASE_ALLOCATION: 0, BITMAP: 1}


async def test_extents_of_some_contexts_merge_equal_neighbours_across_windows():
    node = canned()
    ranges = [r async for r in node.extents(contexts=[BITMAP], window=30)]
    assert [(r.offset, r.length, r.dirty) for r in ranges] == [
        (0, 10, False), (10, 70, True), (80, 20, False)]
    assert node.asked == [(0, 30), (30, 30), (60, 30), (90, 10)]
    assert isinstance(ranges[0], BlockRange) and ranges[1].end == 80


async def test_one_context_only_when_it_is_named():
    node = canned()
    with pytest.raises(InvalidArgumentError, match="several metadata contexts.*b0"):
        await node.block_status(100, 0)
    with pytest.raises(InvalidArgumentError, match="'qemu:nope' was not negotiated"):
        await node.block_status(100, 0, context="qemu:nope")
    assert await node.block_status(100, 0, context=BITMAP) == canned().runs[BITMAP]
    assert (await node.block_status_all(100, 0)).keys() == {BASE_ALLOCATION, BITMAP}


def test_extent_properties():
    assert Extent(0, 1, StateFlag.HOLE | StateFlag.ZERO).hole
    assert Extent(0, 1, StateFlag.ZERO).zero and not Extent(0, 1, StateFlag.ZERO).hole
    assert Extent(0, 1, 1).dirty and not Extent(0, 1, 0).dirty


async def test_the_only_context_needs_no_name(autojump_clock):
    with trio.fail_after(60):
        async with open_in_process() as (dev, _):
            await dev.pwrite(b"x" * 4096, 0)
            extents = await dev.block_status(dev.size, 0)
            assert extents[0].offset == 0 and not extents[0].hole and extents[-1].hole
            assert await dev.block_status_all(dev.size, 0) == {BASE_ALLOCATION: extents}


@pytest.mark.interop
async def test_a_whole_8_gib_export_is_asked_about_in_windows(tmp_path: Path):
    """block_status(dev.size, 0) used to send one request of 4 GiB - 1 bytes, which
    makes nbdkit 1.32.5 abort; now windows of at most 1 GiB, continued where each
    reply ends."""
    with Nbdkit(tmp_path, "memory", "8G") as server, trio.fail_after(60):
        async with open_nbd(server.uri()) as dev:
            await dev.pwrite(b"d" * 65536, 5 * GiB)
            before = dev.statistics().requests
            extents = await dev.block_status(dev.size, 0)
            asked = dev.statistics().requests - before
    assert asked >= 8 * GiB // BLOCK_STATUS_WINDOW
    assert sum(e.length for e in extents) == 8 * GiB
    data = [e for e in extents if not e.hole]
    assert data and data[0].offset <= 5 * GiB < data[0].offset + data[0].length
