"""FifoMutex (send_mutex, receive_mutex) and Count (the port's in-flight counts)."""

import pytest
import trio
import trio.testing

from blockdrv.nbd.locks import FifoMutex
from blockdrv.util.count import Count


async def test_fifo_mutex_serves_waiters_in_order_and_newcomers_never_overtake():
    mutex = FifoMutex()
    mutex.acquire_nowait()
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with mutex:
            order.append(n)
            await trio.lowlevel.checkpoint()  # hold it across a checkpoint

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(waiter, n)
                await trio.testing.wait_all_tasks_blocked()
            mutex.release()  # handed to waiter 0, not freed
            assert mutex.locked()
            with pytest.raises(trio.WouldBlock):
                mutex.acquire_nowait()  # a newcomer cannot take it in between
    assert order == [0, 1, 2]
    assert not mutex.locked()


async def test_fifo_mutex_cancelled_waiter_leaves_the_queue():
    mutex = FifoMutex()
    mutex.acquire_nowait()
    with trio.fail_after(5):
        with trio.move_on_after(0.01):
            await mutex.acquire()
        mutex.release()  # nobody waits any more: free
    assert not mutex.locked()
    with pytest.raises(RuntimeError):
        mutex.release()


async def test_count_wakes_waiters_and_is_a_plain_store_without_them():
    count = Count(0)
    count.add(2)
    assert count.value == 2
    seen: list[int] = []

    async def wait_zero() -> None:
        seen.append(await count.wait_value(0))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_zero)
            await trio.testing.wait_all_tasks_blocked()
            count.add(-1)
            count.add(-1)
    assert seen == [0]
    count.value = 3  # the setter, with nobody waiting
    assert count.value == 3


async def test_count_wakes_only_the_waiters_whose_condition_holds():
    count = Count(3)
    woken: list[tuple[str, int]] = []

    async def wait(name: str, condition) -> None:
        woken.append((name, await count.wait_value(condition)))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, "zero", 0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait, "below-two", lambda n: n < 2)
            await trio.testing.wait_all_tasks_blocked()
            count.add(-1)  # 2: nobody
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            count.value = 0  # both, with the value that woke them
    assert sorted(woken) == [("below-two", 0), ("zero", 0)]


async def test_count_wait_is_a_checkpoint_and_a_cancelled_waiter_leaves():
    count = Count(0)
    with trio.testing.assert_checkpoints():
        assert await count.wait_value(0) == 0
    with trio.CancelScope() as scope:
        scope.cancel()
        await count.wait_value(5)
    assert "0 waiting" in repr(count)
    count.add(5)  # no waiter left to wake
