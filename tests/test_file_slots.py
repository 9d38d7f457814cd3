"""``FileSlots``: the files' cap (half the batch by default, at least one, the configured
number at most the batch), waiting first come first served, no waiting at timeout 0, and the
count reported."""

from __future__ import annotations

import asyncio

import pytest

from dsm_stt.server.config import ServerConfig, ServerConfigError
from dsm_stt.server.file_slots import FileSlots


def test_the_cap() -> None:
    assert [FileSlots(None).limit(b) for b in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 32]
    assert [FileSlots(6).limit(b) for b in (1, 4, 8)] == [1, 4, 6]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ServerConfigError, match="max_file_slots"):
            ServerConfig(max_file_slots=bad)  # type: ignore[arg-type]


def test_files_wait_their_turn_in_order() -> None:
    async def main() -> None:
        counts: list[int] = []
        slots = FileSlots(2, on_change=counts.append)
        assert await slots.acquire(8, timeout=0)
        assert await slots.acquire(8, timeout=0)
        assert not await slots.acquire(8, timeout=0)  # the cap is reached: no waiting
        assert not await slots.acquire(8, timeout=0.05)  # nobody left in time
        order: list[str] = []

        async def wait(name: str) -> None:
            assert await slots.acquire(8, timeout=5)
            order.append(name)

        waiters = [asyncio.ensure_future(wait(n)) for n in "abc"]
        await asyncio.sleep(0.01)
        cancelled = asyncio.ensure_future(slots.acquire(8, timeout=5))
        await asyncio.sleep(0.01)
        cancelled.cancel()  # a waiter that gives up takes nothing
        slots.release()
        await asyncio.sleep(0.01)
        assert order == ["a"]
        slots.release()
        slots.release()
        await asyncio.gather(*waiters)
        assert order == ["a", "b", "c"] and slots.used == 2
        # taken, taken, given back, taken by a, given back twice, taken by b and c
        assert counts == [1, 2, 1, 2, 1, 0, 1, 2]

    asyncio.run(main())
