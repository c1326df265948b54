"""The fio-like load behind ``blockdrv bench`` and ``scripts/bench`` (issue 7).

No timing is asserted here: these tests check that the load does the work it promises
(requests, offsets, patterns, drained sections), not how fast it is.
"""

from __future__ import annotations

import pytest
import trio
from support.inprocess import open_in_process

from blockdrv.bench.engine import run_bench
from blockdrv.block import TraceFilter, insert_filter
from blockdrv.server import Export, MemoryBackend
from blockdrv.util.units import MiB


async def _bench(raises: type[Exception] | None = None, match: str = "", **kwargs):
    with trio.fail_after(30):
        async with open_in_process(Export("", MemoryBackend(MiB)), max_in_flight=64) as (dev, _):
            trace = TraceFilter(capacity=100_000)
            await insert_filter(dev, trace)
            if raises is None:
                result = await run_bench(dev, **kwargs)
            else:
                with pytest.raises(raises, match=match):
                    await run_bench(dev, **kwargs)
                result = None
    return result, trace.records


@pytest.mark.parametrize("pattern", ["read", "write", "mixed"])
async def test_requests_are_sequential_wrapping_over_the_span(pattern):
    result, records = await _bench(pattern=pattern, request_size=4096, depth=4, count=40,
                                   span=64 * 1024)
    assert result.ops == 40 and result.bytes == 40 * 4096
    assert len(result.latencies) == 40
    assert sorted(r.offset for r in records) == sorted((i * 4096) % 65536 for i in range(40))
    kinds = [r.kind for r in records]
    expected = {"read": {"read": 40}, "write": {"write": 40},
                "mixed": {"read": 20, "write": 20}}[pattern]
    assert {k: kinds.count(k) for k in set(kinds)} == expected
    summary = result.summary()
    assert summary["iops"] > 0 and summary["p50"] <= summary["p99"] <= summary["max"]
    assert "drains" not in summary


async def test_drained_sections_are_timed_and_fail_nothing():
    result, records = await _bench(pattern="read", request_size=4096, depth=16, count=2000,
                                   drains=5)
    assert result.ops == 2000
    assert len(result.drain_seconds) == 5
    assert all(r.error is None for r in records)
    summary = result.summary()
    assert summary["drains"] == 5 and summary["drain_p50"] <= summary["drain_max"]


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "random"}, "pattern"),
    ({"request_size": 0}, "positive"),
    ({"depth": 0}, "positive"),
    ({"count": None}, "count or a duration"),
    ({"request_size": 2 * MiB}, "smaller than one request"),
])
async def test_bad_arguments_are_refused(kwargs, message):
    _, records = await _bench(ValueError, message, **({"count": 1} | kwargs))
    assert not records
