"""One streaming session per WebSocket connection, wire-compatible with moshi-server (spec §5).

Owns ``Session``, a ``session.ChannelSession`` (which owns the lifecycle, ``SessionState``, the
channel in the runner and the two tasks):

``CONNECTING`` (auth and capacity checks; refusals are HTTP responses, before any slot is
taken) → ``WAITING`` (accepted, waiting for a slot: at once, or up to ``queue_timeout``) →
``STREAMING`` (``Ready`` sent; audio in, words out) → ``FINISHING`` (server shutdown: input
stops, the last words go out) → ``CLOSED``.

Of the two tasks, the receiver decodes client frames and turns them into runner commands
(every malformed message gets an ``Error`` and the session goes on); the sender is the only
writer on the socket and sends what the runner produced, in order. The slot is released the
moment the client goes away. Keep-alive pings and the 20 s "no frame" rule are the WebSocket
layer's (uvicorn's ping interval/timeout); the 120 s "no audio" rule is enforced here.

End of turn (extension, opt-in per session): ``?end_of_turn=1`` in the URL makes the session
follow its ``Step`` messages with a ``TurnDetector`` (``engine/turns.py``) and send an
``EndOfTurn`` message right after the ``Step`` that ended a turn. ``end_of_turn_head`` (default
2) and ``end_of_turn_threshold`` (default 0.5) choose the VAD head and how sure it must be, as
Kyutai's scripts do; bad values, or a model without VAD heads, get HTTP 400 before the upgrade.
Without the parameter the messages are exactly moshi-server's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..audio import AudioDecodeError, OggOpusStreamDecoder
from ..engine.events import Closed, Step, Word
from ..engine.turns import TurnConfig, TurnDetector
from .protocol import (
    Audio,
    ClientMessage,
    EndOfTurn,
    Error,
    Flush,
    Flushed,
    Init,
    Marker,
    OggOpus,
    ProtocolError,
    Ready,
    decode_client_message,
    encode_server_message,
)
from .runner import Dropped
from .session import SHUTTING_DOWN, ChannelSession, CloseRequest, SessionState

if TYPE_CHECKING:
    from .context import ServerContext

log = logging.getLogger(__name__)

# Ogg/Opus bytes decoded at once: 2 kB of Opus silence (about 3 bytes per 20 ms packet) is
# some 14 s of audio, so a decompression bomb never decodes far past the session's bound
_OPUS_SLICE = 2048


async def asr_streaming(websocket: WebSocket) -> None:
    """The ``/api/asr-streaming`` WebSocket endpoint."""
    await Session(websocket, websocket.app.state.server).run()


def request_key(headers: object, query: object | None) -> str | None:
    """moshi-server's auth: the ``kyutai-api-key`` header, else the ``auth_id`` query parameter
    (for browsers, which cannot set WebSocket headers)."""
    key = headers.get("kyutai-api-key")  # type: ignore[attr-defined]
    if key is None and query is not None:
        key = query.get("auth_id")  # type: ignore[attr-defined]
    return key


END_OF_TURN_HEAD = 2  # Kyutai's scripts and Unmute: head 2 (a 2 s pause) ...
END_OF_TURN_THRESHOLD = 0.5  # ... over 0.5 (the scripts; Unmute uses 0.6)
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def end_of_turn_config(query: object, vad_heads: int) -> TurnConfig | None:
    """The session's end-of-turn settings from its URL query (``end_of_turn``,
    ``end_of_turn_head``, ``end_of_turn_threshold``); None when not asked for. ``ValueError``
    names a bad value, or a model whose ``vad_heads`` cannot do it."""
    get = query.get  # type: ignore[attr-defined]
    flag = (get("end_of_turn") or "0").strip().lower()
    if flag not in _YES + _NO:
        raise ValueError(f"end_of_turn must be 1 or 0, got {flag[:32]!r}")
    if flag in _NO:
        return None
    try:
        head = int(get("end_of_turn_head") or END_OF_TURN_HEAD)
        threshold = float(get("end_of_turn_threshold") or END_OF_TURN_THRESHOLD)
        config = TurnConfig(head=head, threshold=threshold)
    except ValueError as exc:
        raise ValueError(f"end_of_turn: {exc}") from None
    if vad_heads < config.heads_needed:
        raise ValueError(
            f"end_of_turn needs VAD head {head}; this model has {vad_heads} VAD head(s)"
        )
    return config


class Session(ChannelSession):
    """One moshi-protocol connection (see the module docstring)."""

    def __init__(self, websocket: WebSocket, server: ServerContext) -> None:
        super().__init__(websocket, server)
        self._opus: OggOpusStreamDecoder | None = None
        # Markers and Flushes read but not answered yet (at most ``max_pending_markers``)
        self._unanswered = 0
        self._flooded = False  # the session ends: the receive loop reads no more
        self._turns: TurnDetector | None = None  # with ?end_of_turn=1

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        server, ws = self.server, self.ws
        origin = ws.headers.get("origin")
        allowed = self.config.allowed_origins
        if allowed and origin is not None and origin.rstrip("/") not in allowed:
            server.metrics.reject("unauthorized")
            self._move(SessionState.CLOSED)
            await _deny(ws, 403, f"origin not allowed: {origin}")
            return
        if not server.authorized(request_key(ws.headers, ws.query_params)):
            server.metrics.reject("unauthorized")
            self._move(SessionState.CLOSED)
            await _deny(ws, 401, "unauthorized: missing or unknown API key")
            return
        if not server.accepting:
            server.metrics.reject("shutting_down")
            self._move(SessionState.CLOSED)
            await _deny(ws, 503, SHUTTING_DOWN)
            return
        try:
            turns = end_of_turn_config(ws.query_params, server.vad_heads)
        except ValueError as exc:
            self._move(SessionState.CLOSED)
            await _deny(ws, 400, str(exc))
            return
        if turns is not None:
            self._turns = TurnDetector(turns, server.runner.scheduler.frame_rate)
        await self._accept_and_serve()

    async def _serve(self) -> None:
        if await self._admit():
            await self._stream(self.ws.send_bytes(encode_server_message(Ready())))

    async def _send_error(self, message: str, code: str) -> None:
        await self.ws.send_bytes(encode_server_message(Error(message)))

    # -- receiving -------------------------------------------------------------------------------

    async def _receive_loop(self) -> str:
        async for message in self._frames():
            data = message.get("bytes")
            if data is None:
                continue  # text frames are ignored, as moshi-server does
            self._heard_audio()
            try:
                msg = decode_client_message(data, max_message_bytes=self.config.max_message_bytes)
            except ProtocolError as exc:
                self._post(Error(str(exc)))
                continue
            await self._handle(msg)
            if self._flooded:
                return "flood"
        return self.ended_by

    def _timeout_error(self, message: str) -> object:
        return Error(message)

    async def _handle(self, msg: ClientMessage) -> None:
        runner, channel = self.server.runner, self.channel
        assert channel is not None
        if isinstance(msg, Audio):
            if msg.pcm.size:
                await self.server.read_ahead.wait_for_room(channel, msg.pcm.size)
                runner.feed(channel, msg.pcm)
        elif isinstance(msg, OggOpus):
            if self._opus is None:
                self._opus = OggOpusStreamDecoder(round(self.server.sample_rate))
            # Decoded off the event loop and a slice at a time, each waiting for room in the
            # session's audio bound: a few kB of Opus silence can decode to an hour of audio,
            # which is then throttled like a fast sender instead of queued at once.
            data = memoryview(msg.data)
            for start in range(0, len(data), _OPUS_SLICE):
                try:
                    pcm = await asyncio.to_thread(
                        self._opus.feed, data[start : start + _OPUS_SLICE]
                    )
                except AudioDecodeError as exc:
                    self._opus = None  # the next OggOpus message must start a new stream
                    self._post(Error(f"OggOpus: {exc}"))
                    return
                if pcm.size:
                    await self.server.read_ahead.wait_for_room(channel, pcm.size)
                    runner.feed(channel, pcm)
        elif isinstance(msg, Marker | Flush) and not self._count_question():
            return
        elif isinstance(msg, Marker):
            runner.marker(channel, msg.id)
        elif isinstance(msg, Flush):
            if self._opus is not None:  # the Ogg stream is final too: take what it holds back
                opus, self._opus = self._opus, None
                tail = opus.close()
                if tail.size:
                    runner.feed(channel, tail)
            runner.flush(channel, msg.id)
        elif isinstance(msg, Init):
            self._opus = None
            runner.reset(channel)

    def _count_question(self) -> bool:
        """Count one more Marker or Flush; past the limit, end the session as a flood."""
        limit = self.config.max_pending_markers
        if self._unanswered >= limit:
            self._post(
                Error(f"more than {limit} Markers / Flushes waiting for their answer: closing"),
                CloseRequest(1008, "marker flood"),
            )
            self._flooded = True
            return False
        self._unanswered += 1
        return True

    # -- sending ---------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        assert self.channel is not None
        ws = self.ws
        try:
            while True:
                for item in await self.channel.get():
                    if isinstance(item, Closed):  # end of a stream closed at shutdown
                        await ws.close(1001, SHUTTING_DOWN)
                        return
                    if isinstance(item, Dropped):
                        await ws.send_bytes(encode_server_message(Error(item.reason)))
                        await ws.close(1011, "stream dropped")
                        return
                    if isinstance(item, CloseRequest):
                        await ws.close(item.code, item.reason)
                        return
                    await ws.send_bytes(encode_server_message(item))  # type: ignore[arg-type]
                    if isinstance(item, Marker | Flushed):
                        self._unanswered -= 1
                    elif self._turns is not None:
                        await self._follow_turns(item)
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:  # the client went away
            log.debug("send failed: %s", exc)

    async def _follow_turns(self, item: object) -> None:
        """``?end_of_turn=1``: an ``EndOfTurn`` right after the Step that ended a turn."""
        assert self._turns is not None
        if isinstance(item, Ready):  # a mid-session Init: the stream starts over
            self._turns.reset()
        elif isinstance(item, Step | Word):
            for event in self._turns.push(item):
                if isinstance(event, EndOfTurn):
                    await self.ws.send_bytes(encode_server_message(event))


async def _deny(ws: WebSocket, status: int, text: str) -> None:
    """Refuse the upgrade with an HTTP response (before accepting: no slot is ever taken)."""
    try:
        await ws.send_denial_response(PlainTextResponse(text, status))
    except RuntimeError:  # an ASGI server without the denial-response extension: plain 403
        await ws.close(1008)
