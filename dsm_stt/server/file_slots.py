"""How file transcriptions share the engine's slots with live sessions: ``FileSlots``.

Owns the one rule: the file requests of both POST routes (``/api/asr-streaming`` and
``/v1/audio/transcriptions``) together hold at most ``N`` of the engine's ``B`` slots
(``--max-file-slots``; by default half the batch, at least one). Live sessions (the
WebSockets) are admitted first: they never queue behind a file and take any free slot, so
files can fill the batch only up to ``N`` and at least ``B - N`` slots stay for live audio
(with ``B = 1`` the default lets a file take the only slot). A file past the cap waits for
another file to finish, first come first served, up to ``post_queue_timeout``; then it asks
the runner for an engine slot like any session (a free one exists unless live sessions hold
them). A file that cannot start in time gets 503.

It counts, and nothing else: which slot a stream gets is the scheduler's business, and the
routes decide what to answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FileSlots:
    """The file requests' share of the slots; lives on the event loop. The cap is known once
    the engine is (``limit``); ``acquire`` / ``release`` bracket one file's transcription."""

    def __init__(
        self, max_slots: int | None, on_change: Callable[[int], None] | None = None
    ) -> None:
        self.max_slots = max_slots
        self.used = 0
        self._on_change = on_change
        self._free: asyncio.Semaphore | None = None  # made at first use: the batch is known

    def limit(self, total_slots: int) -> int:
        """The cap for an engine of ``total_slots`` slots."""
        if self.max_slots is not None:
            return min(self.max_slots, total_slots)
        return max(1, total_slots // 2)

    async def acquire(self, total_slots: int, timeout: float) -> bool:
        """Take a file slot, waiting up to ``timeout`` seconds (first come, first served; 0:
        not at all); False if none freed in time. asyncio's semaphore wakes its waiters in order and
        gives a permit back when a waiter is cancelled."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.limit(total_slots))
        if timeout <= 0 and self._free.locked():
            return False  # no waiting: the cap is reached
        try:
            await asyncio.wait_for(self._free.acquire(), max(timeout, 0.0) or None)
        except asyncio.TimeoutError:
            return False
        self._count(+1)
        return True

    def release(self) -> None:
        """Give back a slot taken by ``acquire``."""
        assert self._free is not None and self.used > 0, "release without acquire"
        self._count(-1)
        self._free.release()

    def _count(self, change: int) -> None:
        self.used += change
        if self._on_change is not None:
            self._on_change(self.used)
