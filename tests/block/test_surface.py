"""The I/O surface is declared once, by :class:`~blockdrv.block.BlockNode`; everything
else that offers it (the driver, multi-conn, drained-section handles, bypasses, the
asyncio and blocking facades) is checked against it here: the same methods with the
same parameters, so a new command or flag that misses one of them fails this test."""

from __future__ import annotations

import inspect

import pytest

from blockdrv.aio import AioDevice, AioDrainedSection
from blockdrv.block.node import IO, BlockNode, Bypass, DrainedSection
from blockdrv.nbd import MultiConnDevice, NBDDevice
from blockdrv.sync import SyncDevice

SURFACE = ["pread", "pread_into", "pwrite", "zero", "trim", "flush", "cache",
           "block_status", "block_status_all", "extents", "pick_context"]

OFFERS = [NBDDevice, MultiConnDevice, DrainedSection, Bypass, AioDevice, AioDrainedSection,
          SyncDevice]

# What a facade does not offer yet (issue 24 completes them); anything else missing or
# different fails.
GAPS = {
    (DrainedSection, "extents"), (Bypass, "extents"), (AioDrainedSection, "extents"),
    (AioDevice, "pick_context"), (AioDrainedSection, "pick_context"),
    (SyncDevice, "extents"), (SyncDevice, "pick_context"),
    (SyncDevice, "pread_into:holes"),
}


def parameters(cls: type, name: str) -> list[tuple[str, str, object]] | None:
    method = getattr(cls, name, None)
    if method is None:
        return None
    return [(p.name, p.kind.name, p.default)
            for p in inspect.signature(method).parameters.values() if p.name != "self"]


def differences(cls: type) -> set[tuple[type, str]]:
    found = set()
    for name in SURFACE:
        mine, model = parameters(cls, name), parameters(BlockNode, name)
        if mine is None:
            found.add((cls, name))
        elif mine != model:
            missing = {p[0] for p in model or []} - {p[0] for p in mine}
            if missing:
                found.update((cls, f"{name}:{p}") for p in sorted(missing))
            else:
                found.add((cls, f"{name}:parameters"))
    return found


def test_the_surface_is_blocknodes_public_io():
    public = {name for name, value in vars(BlockNode).items()
              if not name.startswith("_") and inspect.iscoroutinefunction(value)
              or inspect.isasyncgenfunction(value)}
    assert public - {"drained", "wait_draining"} == set(SURFACE) - {"pick_context"}


def test_the_internal_route_matches_the_port():
    """IO, what a port routes to, takes exactly the port's parameters."""
    for name in SURFACE:
        if hasattr(IO, name):
            assert parameters(IO, name) == parameters(BlockNode, name), name


@pytest.mark.parametrize("cls", OFFERS, ids=lambda cls: cls.__name__)
def test_every_offer_of_the_surface_matches_it(cls):
    assert differences(cls) == {gap for gap in GAPS if gap[0] is cls}


def test_a_facade_missing_a_flag_is_found():
    class Drifted(SyncDevice):
        def zero(self, count: int, offset: int, *, may_trim: bool = True) -> None:
            """A copy that lost two flags."""

    assert {(Drifted, "zero:fast"), (Drifted, "zero:fua")} <= differences(Drifted)
