"""What a WebSocket session on the runner is, whichever protocol it speaks: ``ChannelSession``,
the base of ``websocket.Session`` (moshi-server's protocol) and ``realtime.RealtimeSession``
(OpenAI's Realtime).

Owns the session's lifecycle (``SessionState``) past the upgrade: the accept, its channel in
the runner and its admission (at once, or up to ``queue_timeout``; a refusal is an error frame
and a close), its registration with the server and the read-ahead bound, its two tasks (the
receiver reads client frames, ``_frames``, until the client leaves or sends no audio for
``audio_timeout``; the sender is the only writer on the socket), the shutdown
``finish`` (input stops, the last words go out), the drop of a client that does not read what
it is sent, and posting to the channel. The cleanup when the session ends, however it ends, is
here too. The subclasses own what goes over the wire: the HTTP refusals before the upgrade, the
frames, the messages and the error frame's shape (``_send_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnected

from .runner import Channel

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .context import ServerContext

NO_FREE_CHANNELS = "no free channels"
SHUTTING_DOWN = "the server is shutting down"


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    WAITING = "waiting"
    STREAMING = "streaming"
    FINISHING = "finishing"
    CLOSED = "closed"


_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CONNECTING: frozenset({SessionState.WAITING, SessionState.CLOSED}),
    SessionState.WAITING: frozenset({SessionState.STREAMING, SessionState.CLOSED}),
    SessionState.STREAMING: frozenset({SessionState.FINISHING, SessionState.CLOSED}),
    SessionState.FINISHING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class SessionStateError(RuntimeError):
    """An internal lifecycle transition that is not allowed (a bug, never a client error)."""


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """Sender instruction: close the socket after what was queued before."""

    code: int
    reason: str = ""


class ChannelSession:
    """One WebSocket connection streaming on the runner (see the module docstring)."""

    # in the subclass module's log: "<kind> failed", "dropping a <kind> whose client does not
    # read its <units>"
    _kind = "session"
    _units = "messages"
    # the close code when no slot came free in time, and whether a refusal's close says why
    _no_slot_code = 1000
    _refusal_reason = False

    def __init__(self, websocket: WebSocket, server: ServerContext) -> None:
        self.ws = websocket
        self.server = server
        self.config = server.config
        self.state = SessionState.CONNECTING
        self.channel: Channel | None = None
        self._receiver: asyncio.Task[str] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._dropped = False
        self.ended_by = ""  # why ``_frames`` stopped: "disconnected" or "timeout"
        self._audio_deadline = 0.0  # event-loop time by which audio must come

    def _move(self, state: SessionState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise SessionStateError(f"session cannot go from {self.state.value} to {state.value}")
        self.state = state

    # -- the subclass's part ---------------------------------------------------------------------

    async def _serve(self) -> None:
        """The accepted session: ``_admit``, then ``_stream``."""
        raise NotImplementedError

    async def _receive_loop(self) -> str:
        """Read client frames until the session ends; "disconnected" when the client left."""
        raise NotImplementedError

    async def _send_loop(self) -> None:
        raise NotImplementedError

    async def _send_error(self, message: str, code: str) -> None:
        """One error frame in the session's protocol (``code``: OpenAI's error code)."""
        raise NotImplementedError

    def _timeout_error(self, message: str) -> object:
        """What the session posts (before its close) when no audio came for too long."""
        raise NotImplementedError

    # -- receiving -------------------------------------------------------------------------------

    async def _frames(self) -> AsyncIterator[dict[str, Any]]:
        """The client's ``websocket.receive`` messages, until it leaves ("disconnected") or no
        audio came for ``audio_timeout`` ("timeout": the timeout error and a close 1000 are
        posted); ``ended_by`` says which. ``_heard_audio`` restarts the audio clock."""
        loop = asyncio.get_running_loop()
        timeout = self.config.audio_timeout
        self._audio_deadline = loop.time() + timeout
        while True:
            remaining = self._audio_deadline - loop.time()
            if remaining <= 0:
                message = f"no audio received for {timeout:g} s: closing the session"
                self._post(self._timeout_error(message), CloseRequest(1000, "audio timeout"))
                self.ended_by = "timeout"
                return
            try:
                message = await asyncio.wait_for(self.ws.receive(), remaining)
            except asyncio.TimeoutError:
                continue
            except WebSocketDisconnected:  # the sender closed the socket
                message = {"type": "websocket.disconnect"}
            if message["type"] == "websocket.disconnect":
                self.ended_by = "disconnected"
                return
            yield message

    def _heard_audio(self) -> None:
        self._audio_deadline = asyncio.get_running_loop().time() + self.config.audio_timeout

    # -- lifecycle -------------------------------------------------------------------------------

    async def _accept_and_serve(self, **accept: Any) -> None:
        """Accept the upgrade (its checks passed; ``accept``: ``WebSocket.accept``'s arguments)
        and serve; frees everything at the end."""
        server = self.server
        try:
            await self.ws.accept(**accept)
        except Exception:  # the client left during the handshake
            self._move(SessionState.CLOSED)
            return
        server.metrics.connect.inc()
        self._move(SessionState.WAITING)
        server.register(self)
        try:
            await self._serve()
        except Exception:  # a bug must not take the server down: log it, free the slot
            logging.getLogger(type(self).__module__).exception("%s failed", self._kind)
        finally:
            if self.channel is not None:
                server.read_ahead.channels.discard(self.channel)
                server.runner.remove(self.channel)
            for task in (self._receiver, self._sender):
                if task is not None:
                    task.cancel()
            self.state = SessionState.CLOSED
            server.unregister(self)

    async def _admit(self, **admit: Any) -> bool:
        """A channel in the runner and a slot for it; False (the client told, the socket
        closed) when none came free in time or the server began shutting down."""
        server = self.server
        self.channel = server.runner.channel(
            max_pending=self.config.max_outbound_messages, on_overflow=self._on_overflow
        )
        admitted = await server.runner.admit(
            self.channel, timeout=self.config.queue_timeout, **admit
        )
        if admitted and self.state is SessionState.WAITING:
            self._move(SessionState.STREAMING)
            return True
        if server.accepting:
            code, message, close = "no_free_channels", NO_FREE_CHANNELS, self._no_slot_code
        else:
            code, message, close = "shutting_down", SHUTTING_DOWN, 1001
        server.metrics.reject(code)
        await quietly(self._send_error(message, code))
        await quietly(self.ws.close(close, message if self._refusal_reason else None))
        return False

    async def _stream(self, hello: Awaitable[None]) -> None:
        """Count the channel in the read-ahead bound, send ``hello`` (the protocol's first
        frame), run the two tasks until the session ends (the runner's stream is removed at
        the end of ``_accept_and_serve``); a client dropped for not reading is told why, if it
        still reads at all."""
        assert self.channel is not None
        self.server.read_ahead.channels.add(self.channel)
        await hello
        self._sender = asyncio.create_task(self._send_loop())
        self._receiver = asyncio.create_task(self._receive_loop())
        await asyncio.wait({self._sender, self._receiver}, return_when=asyncio.FIRST_COMPLETED)
        receiver = self._receiver
        if receiver.done() and not receiver.cancelled() and receiver.result() == "disconnected":
            return  # nobody to send to
        await asyncio.wait({self._sender})  # (does not raise if the sender was cancelled)
        if self._dropped:
            limit = self.config.max_outbound_messages
            message = f"more than {limit} {self._units} wait unread by this client: closing"
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(quietly(self._send_error(message, "client_too_slow")), 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(quietly(self.ws.close(1011, "client does not read")), 1.0)

    def finish(self) -> None:
        """Server shutdown: stop reading, send the last words, close (event-loop thread)."""
        if self.state is SessionState.WAITING and self.channel is not None:
            self.server.runner.remove(self.channel)  # the pending admission answers False
        elif self.state is SessionState.STREAMING and self.channel is not None:
            self._move(SessionState.FINISHING)
            if self._receiver is not None:
                self._receiver.cancel()
            self.server.runner.close(self.channel)

    def _on_overflow(self) -> None:
        """The client does not read what we send: drop it so its backlog cannot grow."""
        if self._dropped:
            return
        self._dropped = True
        logging.getLogger(type(self).__module__).warning(
            "dropping a %s whose client does not read its %s", self._kind, self._units
        )
        self.server.metrics.reject("too_slow")
        for task in (self._receiver, self._sender):
            if task is not None:
                task.cancel()

    def _post(self, *items: object) -> None:
        assert self.channel is not None
        self.channel.post(list(items))


async def quietly(awaitable: object) -> None:
    """Await a send/close whose failure (client already gone) changes nothing."""
    with contextlib.suppress(Exception):
        await awaitable  # type: ignore[misc]
