"""OpenAI's Realtime transcription WebSocket (``/v1/realtime?intent=transcription``), one engine
slot per connection.

Owns ``RealtimeSession``: the GA event vocabulary of a transcription session (JSON text frames;
the beta names ``transcription_session.update`` / ``.created`` / ``.updated`` too), its
lifecycle, its audio buffer, and the turn detection that commits items by itself. Settings and
input formats are ``realtime_config.py``'s, the items and the two clocks
``realtime_items.py``'s; the model's VAD heads are read through ``engine/turns.py``; the
lifecycle, the channel in the runner and its two tasks are ``session.ChannelSession``'s, as for
``websocket.py``'s sessions, with the same limits (read-ahead back-pressure, the outbound
message limit, keep-alive, the audio timeout, the graceful drain). The receiver task reads and
applies client events; the sender task is the only writer on the socket and turns what the
runner produced into events, in order.

Audio goes to the model as it is appended, so words come out as they are decoded: each one is a
``conversation.item.input_audio_transcription.delta`` of the item being spoken. A commit (the
client's ``input_audio_buffer.commit``, or an end of turn) closes the item at a point of the
stream: words that start before it belong to it, later ones to the next item. Then
``input_audio_buffer.committed`` goes out at once and ``...transcription.completed`` once the
item's last word is out: a client's commit is a scheduler flush (``Flushed`` comes right after
the words of the audio), and so is an end of turn whose audio is all in; an end of turn with
more audio queued behind it (a client sending faster than real time) waits for the model to get
the text delay past it instead, so that no silence is inserted into the next turn's speech.
The flushes' silence advances the stream's clock; the times of the events are on the client's
clock (milliseconds of audio appended), so the session keeps track of where it went.
``input_audio_buffer.clear`` drops the open item: its words are not sent (the model still
hears its audio, which keeps its context).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..engine.events import Closed, EndWord, Flushed, Step, Word
from ..engine.turns import EndOfTurn, SpeechStarted, TurnDetector
from .openai_shapes import ModelNames
from .protocol import Error
from .realtime_config import InputDecoder, RealtimeError, SessionConfig, TurnDetection
from .realtime_items import Items, Timeline, new_id, server_event
from .runner import Dropped
from .session import SHUTTING_DOWN, ChannelSession, CloseRequest, SessionState
from .websocket import request_key

if TYPE_CHECKING:
    from .context import ServerContext

log = logging.getLogger(__name__)

_CLIENT_EVENTS = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)
_BROWSER_KEY = "openai-insecure-api-key."  # subprotocol prefix OpenAI's browser clients use


async def realtime_endpoint(websocket: WebSocket) -> None:
    """The ``/v1/realtime`` WebSocket endpoint."""
    await RealtimeSession(websocket, websocket.app.state.server).run()


def realtime_keys(websocket: WebSocket) -> list[str]:
    """The API keys a client gave: ``Authorization: Bearer KEY`` (OpenAI's SDKs), the
    ``openai-insecure-api-key.KEY`` subprotocol (OpenAI's browser clients), moshi-server's
    ``kyutai-api-key`` header or ``?auth_id=`` query. One valid key is enough."""
    keys = []
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    for protocol in websocket.scope.get("subprotocols", []):
        if protocol.startswith(_BROWSER_KEY):
            keys.append(protocol[len(_BROWSER_KEY) :])
    other = request_key(websocket.headers, websocket.query_params)
    return keys if other is None else [*keys, other]


class RealtimeSession(ChannelSession):
    """One Realtime transcription connection (see the module docstring)."""

    _kind = "realtime session"
    _units = "events"
    _no_slot_code = 1013
    _refusal_reason = True

    def __init__(self, websocket: WebSocket, server: ServerContext) -> None:
        super().__init__(websocket, server)
        self.id = new_id("sess_")
        self.beta = False  # the client speaks the beta protocol (OpenAI-Beta: realtime=v1)
        self.settings = SessionConfig()
        self._decoder = InputDecoder(self.settings.format)
        self._turns: TurnDetector | None = None
        self._timeline: Timeline | None = None
        self._items: Items | None = None
        self._steps = 0  # the stream's steps (Step messages) so far
        self._flush_ids = 0
        self._outbox: list[str] = []  # events produced while routing one channel item
        self._routing_now = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        refusal = self._refusal()
        if refusal is not None:
            self._move(SessionState.CLOSED)
            await _deny(self.ws, *refusal)
            return
        offered = self.ws.scope.get("subprotocols", [])
        await self._accept_and_serve(subprotocol="realtime" if "realtime" in offered else None)

    def _refusal(self) -> tuple[int, str, str] | None:
        """(HTTP status, code, message) when the upgrade is refused, before any slot."""
        server, ws = self.server, self.ws
        origin = ws.headers.get("origin")
        allowed = self.config.allowed_origins
        if allowed and origin is not None and origin.rstrip("/") not in allowed:
            server.metrics.reject("unauthorized")
            return 403, "origin_not_allowed", f"origin not allowed: {origin}"
        keys = realtime_keys(ws)
        if not any(server.authorized(key) for key in keys or [None]):
            server.metrics.reject("unauthorized")
            return 401, "invalid_api_key", "unauthorized: missing or unknown API key"
        if not server.accepting:
            server.metrics.reject("shutting_down")
            return 503, "shutting_down", SHUTTING_DOWN
        intent = ws.query_params.get("intent", "transcription")
        if intent != "transcription":
            return (
                400,
                "invalid_intent",
                (
                    f"intent {intent[:64]!r} is not supported: this server runs transcription "
                    "sessions only (?intent=transcription)"
                ),
            )
        return None

    async def _serve(self) -> None:
        server, ws = self.server, self.ws
        self.beta = ws.headers.get("openai-beta", "").strip().lower().startswith("realtime=v1")
        prefix = server.prefix_seconds
        if not await self._admit(time_offset=prefix):
            return
        assert self.channel is not None
        runner = server.runner
        scheduler = runner.scheduler
        prefix_samples = round(prefix * runner.sample_rate)
        self._timeline = Timeline(
            runner.sample_rate, runner.frame_size, scheduler.delay_tokens, prefix_samples
        )
        self._items = Items(self._timeline)
        if prefix_samples:  # the checkpoint's silence prefix, which OpenAI clients never send
            runner.feed(self.channel, np.zeros(prefix_samples, dtype=np.float32))
        self.settings = SessionConfig(
            transcription={
                "model": ModelNames.of(server.engine.name).id if server.engine else None
            },
            turn_detection=TurnDetection() if server.vad_heads >= 1 else None,
        )
        self._configure_turns()
        created = "transcription_session.created" if self.beta else "session.created"
        await self._stream(ws.send_text(json.dumps(self._session_event(created))))

    async def _send_error(self, message: str, code: str) -> None:
        await self.ws.send_text(json.dumps(_error_event(message, code, "server_error")))

    # -- outgoing events -------------------------------------------------------------------------

    def _send(self, *events: dict[str, object]) -> None:
        """Server events, in order with everything else the session sends: queued behind
        what waits in the channel, or, while the sender routes the runner's output, right
        after the thing being routed."""
        if self._routing_now:
            self._outbox.extend(json.dumps(event) for event in events)
        elif events:
            self._post(*events)

    def _session_event(self, kind: str) -> dict[str, object]:
        beta = kind.startswith("transcription_session.")
        return server_event(kind, session=self.settings.describe(self.id, beta=beta))

    def _error(self, exc: RealtimeError, event_id: str | None = None) -> None:
        self._post(_error_event(exc.message, exc.code, exc.kind, exc.param, event_id))

    # -- receiving -------------------------------------------------------------------------------

    async def _receive_loop(self) -> str:
        async for message in self._frames():
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if await self._handle(data):
                self._heard_audio()
        return self.ended_by

    def _timeout_error(self, message: str) -> object:
        return _error_event(message, "audio_timeout", "server_error")

    async def _handle(self, data: str | bytes) -> bool:
        """One client frame; True if it appended audio."""
        event_id = None
        try:
            if len(data) > self.config.max_message_bytes:
                raise RealtimeError(
                    f"event of {len(data)} bytes exceeds the limit of "
                    f"{self.config.max_message_bytes}",
                    "message_too_large",
                )
            event = _parse_json(data)
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = _event_type(event)
            if kind == "input_audio_buffer.append":
                await self._append(event)
                return True
            if kind in ("session.update", "transcription_session.update"):
                self._update(event, beta=kind.startswith("transcription_session."))
            elif kind == "input_audio_buffer.commit":
                self._commit_by_client()
            elif kind == "input_audio_buffer.clear":
                self._clear()
        except RealtimeError as exc:
            self._error(exc, event_id)
        return False

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if audio is None:
            raise RealtimeError(
                "Missing required parameter: 'audio'.", "missing_required_parameter", "audio"
            )
        if not isinstance(audio, str):
            raise RealtimeError(
                "Invalid type for 'audio': expected a base64 string.", "invalid_type", "audio"
            )
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError(
                "Invalid 'audio': not valid base64.", "invalid_value", "audio"
            ) from None
        pcm = self._decoder.feed(raw)
        if pcm.size:
            await self._wait_for_room(pcm.size)
            self._feed(pcm)

    def _feed(self, pcm: np.ndarray) -> None:
        assert self.channel is not None and self._timeline is not None
        if pcm.size:
            # no await between the timeline and the runner: they see the same order
            self._timeline.feed(int(pcm.size))
            self.server.runner.feed(self.channel, pcm)

    def _update(self, event: dict[str, Any], beta: bool) -> None:
        settings = self.settings.update(event.get("session"), beta=beta)
        turn = settings.turn_detection
        if turn is not None and self.server.vad_heads < turn.turn_config().heads_needed:
            raise RealtimeError(
                f"this model has {self.server.vad_heads} VAD head(s), turn detection needs "
                f"{turn.turn_config().heads_needed}: set turn_detection to null and commit "
                "the audio buffer yourself",
                "invalid_value",
                "session.turn_detection" if beta else "session.audio.input.turn_detection",
            )
        if settings.format != self._decoder.format:
            self._feed(self._decoder.close())
            self._decoder = InputDecoder(settings.format)
        self.settings = settings
        self._configure_turns()
        self._post(
            self._session_event("transcription_session.updated" if beta else "session.updated")
        )

    def _configure_turns(self) -> None:
        turn = self.settings.turn_detection
        if turn is None:
            self._turns = None
        elif self._turns is None:
            scheduler = self.server.runner.scheduler
            self._turns = TurnDetector(
                turn.turn_config(), scheduler.frame_rate, self.server.prefix_seconds
            )
            self._turns.steps = self._steps  # the stream's clock so far
        else:
            self._turns.configure(turn.turn_config())

    async def _wait_for_room(self, samples: int) -> None:
        assert self.channel is not None
        await self.server.read_ahead.wait_for_room(self.channel, samples)

    # -- items -----------------------------------------------------------------------------------

    def _commit_by_client(self) -> None:
        assert self._timeline is not None and self._items is not None
        self._feed(self._decoder.close())
        timeline = self._timeline
        if timeline.client_end <= self._items.open.start:
            raise RealtimeError(
                "Error committing input audio buffer: the buffer is empty (no audio appended "
                "since the last commit).",
                "input_audio_buffer_commit_empty",
            )
        boundary = timeline.stream_end
        if self._turns is not None:
            self._turns.end_turn(boundary)
        self._commit(boundary, timeline.client_end, flush=True)

    def _commit(self, boundary: float, client_end: float, flush: bool) -> None:
        """Close the open item at ``boundary`` (stream seconds; ``client_end`` on the client's
        clock): committed now, completed once its last word is out, which a flush brings at
        once; without one, every word that started before the boundary is out once the
        stream is its text delay past it."""
        assert self.channel is not None and self._timeline is not None
        assert self._items is not None
        if flush:
            self._flush_ids += 1
            self._timeline.flush()
            self.server.runner.flush(self.channel, self._flush_ids)
            self._send(*self._items.commit(boundary, client_end, flush_id=self._flush_ids))
        else:
            done = self._steps + self.server.runner.scheduler.delay_tokens + 1
            self._send(*self._items.commit(boundary, client_end, complete_at=done))

    def _clear(self) -> None:
        assert self._timeline is not None and self._items is not None
        self._decoder.close()  # what it holds is dropped too
        self._items.clear()
        if self._turns is not None:
            self._turns.end_turn(self._timeline.stream_end)
        self._send(server_event("input_audio_buffer.cleared"))

    # -- sending ---------------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        assert self.channel is not None
        try:
            while True:
                for item in await self.channel.get():
                    self._routing_now = True
                    try:
                        closing = self._route(item)
                    finally:
                        self._routing_now = False
                    for text in self._outbox:
                        await self.ws.send_text(text)
                    self._outbox.clear()
                    if closing is not None:
                        await self.ws.close(closing.code, closing.reason)
                        return
        except (OSError, RuntimeError, WebSocketDisconnect) as exc:  # the client went away
            log.debug("send failed: %s", exc)

    def _route(self, item: object) -> CloseRequest | None:
        """Turn one thing from the channel into events; a ``CloseRequest`` ends the session."""
        items = self._items
        assert items is not None
        if isinstance(item, dict):
            self._outbox.append(json.dumps(item))
        elif isinstance(item, Word):
            if self._turns is not None:
                self._turn_events(self._turns.push(item))
            self._send(*items.word(item))
        elif isinstance(item, EndWord):
            items.end_word(item.stop_time)
        elif isinstance(item, Step):
            self._steps += 1
            if self._turns is not None:
                self._turn_events(self._turns.push(item))
            self._send(*items.stepped(self._steps))
        elif isinstance(item, Flushed):
            self._send(*items.flushed(item.id))
        elif isinstance(item, Closed):  # shutdown: the stream is transcribed to its end
            self._send(*items.close())
            return CloseRequest(1001, SHUTTING_DOWN)
        elif isinstance(item, Dropped):
            self._send(_error_event(item.reason, "session_dropped", "server_error"))
            return CloseRequest(1011, "stream dropped")
        elif isinstance(item, Error):  # the scheduler refused a command: a bug, say it
            self._send(_error_event(item.message, "server_error", "server_error"))
        elif isinstance(item, CloseRequest):
            return item
        return None

    def _turn_events(self, events: list[object]) -> None:
        assert self._timeline is not None and self._items is not None
        assert self.channel is not None
        for event in events:
            item = self._items.open
            if isinstance(event, SpeechStarted):
                start = max(self._timeline.to_client(event.time), item.start)
                self._send(
                    server_event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=round(start * 1000),
                        item_id=item.id,
                    )
                )
            elif isinstance(event, EndOfTurn):
                end = max(self._timeline.to_client(event.time), item.start)
                self._send(
                    server_event(
                        "input_audio_buffer.speech_stopped",
                        audio_end_ms=round(end * 1000),
                        item_id=item.id,
                    )
                )
                # a flush now would insert silence after all the audio queued: only when
                # that is (almost) nothing, i.e. the client sends at real time
                flush = self.channel.backlog() <= 2 * self.server.runner.frame_size
                self._commit(event.time, end, flush=flush)


def _parse_json(data: str | bytes) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RealtimeError(f"The event is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(event, dict):
        raise RealtimeError("An event must be a JSON object with a 'type'.", "invalid_json")
    return event


def _event_type(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind is None:
        raise RealtimeError(
            "Missing required parameter: 'type'.", "missing_required_parameter", "type"
        )
    if not isinstance(kind, str) or kind not in _CLIENT_EVENTS:
        supported = ", ".join(f"'{k}'" for k in _CLIENT_EVENTS)
        raise RealtimeError(
            f"Invalid value: '{str(kind)[:64]}'. A transcription session takes: {supported}.",
            "invalid_value",
            "type",
        )
    return kind


def _error_event(
    message: str,
    code: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    event_id: str | None = None,
) -> dict[str, object]:
    error = {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
    return server_event("error", error=error)


async def _deny(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with OpenAI's error body (before accepting: no slot is taken)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    try:
        await ws.send_denial_response(JSONResponse(body, status))
    except RuntimeError:  # an ASGI server without the denial-response extension
        await ws.close(1008, message[:120])
