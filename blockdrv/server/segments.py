"""Shaping what a backend returns into reply chunks: read segments and extents.

A read is a list of *segments* ``(offset, length, views or None)`` (see
:mod:`blockdrv.server.backends`); these functions cut, join and round them without
copying data: a data segment's views are sliced, never joined.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from .backends import Segment
from .writer import Buffers


def flatten(segments: list[Segment]) -> Buffers:
    """The buffers of a read with holes filled in as zeroes."""
    out: Buffers = []
    for _, n, views in segments:
        out.extend(views if views is not None else [bytes(n)])
    return out


def cut_views(views: Sequence[memoryview], cut: int) -> tuple[list[memoryview],
                                                              list[memoryview]]:
    """Buffers split after ``cut`` bytes, without copying."""
    head: list[memoryview] = []
    for i, view in enumerate(views):
        if not cut:
            return head, list(views[i:])
        if cut < len(view):
            return [*head, view[:cut]], [view[cut:], *views[i + 1:]]
        head.append(view)
        cut -= len(view)
    return head, []


def split_at_random(segments: list[Segment], rng: random.Random) -> list[Segment]:
    """Cut about half the segments in two at a random point (for shuffled replies)."""
    out: list[Segment] = []
    for at, n, views in segments:
        if n < 2 or rng.random() < 0.5:
            out.append((at, n, views))
            continue
        cut = rng.randrange(1, n)
        if views is None:
            out += [(at, cut, None), (at + cut, n - cut, None)]
        else:
            head, tail = cut_views(views, cut)
            out += [(at, cut, head), (at + cut, n - cut, tail)]
    return out


def cut_into_pieces(segments: list[Segment], size: Callable[[], int]) -> list[Segment]:
    """Segments cut into pieces of ``size()`` bytes each (the last of a segment may be
    shorter), in order."""
    out: list[Segment] = []
    for at, n, views in segments:
        end = at + n
        while at < end:
            piece = min(size(), end - at)
            if views is None:
                out.append((at, piece, None))
            else:
                head, views = cut_views(views, piece)
                out.append((at, piece, head))
            at += piece
    return out


def coarsen(extents: Sequence[tuple[int, int]], block: int) -> list[tuple[int, int]]:
    """Round extents to multiples of ``block``; a block with any data counts as data."""
    out: list[tuple[int, int]] = []
    pos = carry = 0
    carry_flags = -1
    for length, flags in extents:
        end = pos + length
        while pos < end:
            take = min(end - pos, block - carry)
            carry_flags = flags if carry_flags < 0 else carry_flags & flags
            carry += take
            pos += take
            if carry == block:
                if out and out[-1][1] == carry_flags:
                    out[-1] = (out[-1][0] + block, carry_flags)
                else:
                    out.append((block, carry_flags))
                carry, carry_flags = 0, -1
    if carry:
        out.append((carry, carry_flags))
    return out
