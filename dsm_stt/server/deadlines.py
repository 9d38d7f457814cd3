"""HTTP connections that go nowhere are closed: deadlines for a request's headers and body.

Owns ``protocol_class(header_timeout, body_timeout)``, uvicorn's h11 HTTP protocol with two
deadlines it lacks. A connection must deliver a whole request head (request line and
headers; a WebSocket upgrade is one) within ``header_timeout`` seconds of opening, or of
starting its next request on a kept-alive connection: a socket that sends nothing, or
slowloris' headers a byte at a time, is closed then. While a body streams, a gap of more than
``body_timeout`` seconds without a byte closes the connection: a stalled upload frees its slot
instead of holding it. (uvicorn's own ``timeout_keep_alive`` already closes idle kept-alive
connections between requests.) Falls back to uvicorn's class, with a warning, where its h11
protocol lacks what this relies on.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def protocol_class(header_timeout: float, body_timeout: float) -> type | str:
    """The ``http`` setting for ``uvicorn.Config``."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:
        log.warning("no h11 protocol in this uvicorn: no header / body deadlines")
        return "auto"
    if not all(hasattr(H11Protocol, n) for n in ("connection_made", "data_received")):
        log.warning("this uvicorn's h11 protocol differs: no header / body deadlines")
        return "h11"

    class DeadlineProtocol(H11Protocol):  # type: ignore[misc, valid-type]
        """h11 with a deadline for each request head and for each gap in a body."""

        _deadline = None  # the armed TimerHandle, if any

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            self._arm(header_timeout, "no complete request head")

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.get_protocol() is not self:  # upgraded: the WebSocket owns it
                self._disarm()
                return
            state = self.conn.their_state
            if state is h11.SEND_BODY:  # each byte of a body resets its deadline
                self._arm(body_timeout, "the request body stalled")
            elif state is h11.IDLE:  # a head still incomplete: its deadline runs on, not reset
                if self._deadline is None and not self.transport.is_closing():
                    self._arm(header_timeout, "no complete request head")
            else:  # the head is in (or the connection became a WebSocket, or ends)
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # uvicorn's keep-alive timer takes over until the next request
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, why: str) -> None:
            self._disarm()
            if seconds > 0:
                self._deadline = self.loop.call_later(seconds, self._expire, why)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self, why: str) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                log.info("closing an HTTP connection: %s", why)
                self.transport.close()

    return DeadlineProtocol
