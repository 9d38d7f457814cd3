"""WebSocket keep-alive as moshi-server does it: a client that is sending is alive.

Owns ``LivenessProtocol``, uvicorn's sans-I/O WebSocket protocol with two changes to its
keep-alive. Any bytes from the client prove it alive, so a ping goes out only after the client
has been quiet for ``ping_interval``. And the pong deadline never closes a connection while
the server itself is not reading it: a session whose queued audio is at its bound stops
reading (TCP flow control holds the client back), and the client's pong then waits unread in
the socket behind its audio. Stock uvicorn closed such sessions with 1011 "keepalive ping
timeout" after ``ping_interval + idle_timeout`` (20-30 s) although the client was sending all
along: what Kyutai's file client at ``--rtf 1000`` met. A client that dies while held back is
found once its backlog is read: it then stays quiet, its ping goes unanswered and the
connection closes within ``idle_timeout``.

Control frames are bounded too: more than ``MAX_PINGS_PER_SECOND`` pings in a second is a
flood (pongs are written without flow control, so a client that floods pings and never reads
would grow the server's memory): the connection is aborted with 1008 and its slot freed at
once. (How much a client has left unread is no sign of a flood by itself: a client that sends
audio as fast as it can reads its messages late, and it is alive.)

A client that stops reading altogether would hold its connection after the session ends:
closing a transport waits for its buffered bytes to leave, and they never do. Once the
session is over, a connection whose buffer is still full ``ABORT_AFTER`` seconds later is
aborted.

``protocol_class()`` returns it, or uvicorn's own class where this uvicorn has no sans-I/O
implementation with the attributes it relies on (then the stock keep-alive applies).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MAX_PINGS_PER_SECOND = 100  # a client's keep-alive pings once every few seconds
ABORT_AFTER = 5.0  # seconds a finished session's unread bytes may wait for the client


def protocol_class() -> type | str:
    """The ``ws`` setting for ``uvicorn.Config``: ``LivenessProtocol`` where it can be built."""
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import (
            WebSocketsSansIOProtocol,
        )
    except ImportError:  # an older uvicorn: its own keep-alive
        log.warning("this uvicorn has no sans-I/O WebSocket protocol: stock keep-alive pings")
        return "websockets"
    needed = ("send_keepalive_ping", "keepalive_timeout", "schedule_ping", "data_received")
    needed += ("run_asgi",)
    if not all(hasattr(WebSocketsSansIOProtocol, name) for name in needed):
        log.warning("this uvicorn's WebSocket protocol differs: stock keep-alive pings")
        return "websockets-sansio"
    return _liveness(WebSocketsSansIOProtocol)


def _liveness(base: type) -> type:
    class LivenessProtocol(base):  # type: ignore[misc, valid-type]
        """Pings after a quiet spell only; no timeout while the server holds the client back."""

        last_heard = 0.0
        _ping_window = 0.0  # start of the second whose pings are counted
        _pings = 0

        def handle_ping(self) -> None:
            now = self.loop.time()
            if now - self._ping_window >= 1.0:
                self._ping_window, self._pings = now, 0
            self._pings += 1
            if self._pings > MAX_PINGS_PER_SECOND:
                log.warning("closing a connection that floods pings (policy 1008)")
                self.conn.fail(1008, "ping flood")
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.close_sent = True
                self.transport.abort()  # a client that does not read would hold close()
                return
            super().handle_ping()

        async def run_asgi(self) -> None:
            await super().run_asgi()
            writable = getattr(self, "writable", None)
            if writable is not None and not writable.is_set():  # unread bytes wait
                self.loop.call_later(ABORT_AFTER, self._abort_if_unread)

        def _abort_if_unread(self) -> None:
            if self.transport.get_write_buffer_size():
                log.warning("aborting a connection whose client stopped reading")
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            self.last_heard = self.loop.time()
            super().data_received(data)

        def _quiet_for(self) -> float:
            return self.loop.time() - self.last_heard

        def send_keepalive_ping(self) -> None:
            quiet = self._quiet_for()
            if self.read_paused or quiet < self.ping_interval:
                # heard from recently, or not listening (the client is held back): later
                wait = (
                    self.ping_interval - quiet if quiet < self.ping_interval else self.ping_interval
                )
                self.ping_timer = self.loop.call_later(max(wait, 0.01), self.send_keepalive_ping)
                return
            super().send_keepalive_ping()

        def keepalive_timeout(self) -> None:
            if self.read_paused or self._quiet_for() < self.ping_timeout:
                # its pong is behind audio we do not read yet, or the client spoke since
                self.pong_timer = None
                self.pending_ping_payload = None
                self.schedule_ping()
                return
            super().keepalive_timeout()

    LivenessProtocol.__qualname__ = LivenessProtocol.__name__
    return LivenessProtocol
