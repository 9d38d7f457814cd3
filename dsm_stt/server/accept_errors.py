"""What the server says when it runs out of file descriptors: one warning line per interval.

Owns ``AcceptErrorLog``, an event-loop exception handler. When every descriptor is taken (too
many open connections for ``ulimit -n``), asyncio fails each ``accept()`` with EMFILE, pauses
accepting for a second and logs an error with a traceback, every second for as long as it
lasts. This handler turns those into one warning line per ``interval`` that counts the failed
accepts and names the remedy (``--max-connections`` below the descriptor limit, or a higher
``ulimit -n``); every other loop error goes to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dsm_stt.server")

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class AcceptErrorLog:
    """Installed on a loop with ``install``; ``uninstall`` puts the previous handler back."""

    def __init__(
        self,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        self.interval = interval
        self.on_failure = on_failure  # called for each failed accept (a metrics counter)
        self.failed = 0  # accepts that failed for lack of descriptors, in all
        self._clock = clock
        self._unreported = 0
        self._last: float | None = None
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
        self._previous = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self) -> None:
        if self._loop is not None and self._loop.get_exception_handler() is self:
            self._loop.set_exception_handler(self._previous)
        self._loop = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self._count(exc)
        elif self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def _count(self, exc: OSError) -> None:
        self.failed += 1
        self._unreported += 1
        if self.on_failure is not None:
            self.on_failure()
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return
        log.warning(
            "cannot accept connections: %s (%d refused since the last warning); set "
            "--max-connections below the open-files limit (ulimit -n) or raise the limit",
            exc.strerror or exc,
            self._unreported,
        )
        self._last, self._unreported = now, 0
