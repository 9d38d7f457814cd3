"""Async client for the streaming server — this one or moshi-server — over WebSocket + msgpack.

Owns ``SttClient`` (one session: connect and wait for ``Ready``, send ``Audio`` / ``Marker`` /
``Flush`` / ``Init``, iterate over what the server sends), ``stream_audio`` (send a signal
paced at a real-time factor, yield the server's messages until all of it is transcribed),
``microphone`` (80 ms blocks from the sound card; needs the optional ``sounddevice``) and
``LivePrinter`` (a live transcript for a terminal, with the model's end-of-turn indicator).

Ending a stream uses the recipe every moshi-server client uses (a ``Marker``, then silence
until the marker comes back, spec §4.5), so the same code works against both servers.
Messages are the protocol's values (``Word``, ``EndWord``, ``Step``, ``Marker``, ``Error``…);
with ``end_of_turn=True`` this server also sends ``EndOfTurn`` where the model's VAD ends a
turn (moshi-server ignores the request and sends none).
A server that cannot be reached, or a connection that ends before the client is done (the
server died, shut down with 1001, the network dropped), is a ``ConnectionLost`` whose message
is one line for a user; a refusal or an ``Error`` from the server is a ``ServerError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from typing import Any, TextIO

import numpy as np
import websockets

from .model.config import FRAME_SIZE, SAMPLE_RATE
from .server.protocol import (
    Audio,
    EndOfTurn,
    EndWord,
    Error,
    Flush,
    Init,
    Marker,
    ProtocolError,
    Ready,
    ServerMessage,
    Step,
    Word,
    decode_server_message,
    encode_client_message,
)

DEFAULT_URL = "ws://127.0.0.1:8080/api/asr-streaming"
END_OF_TURN_HEAD = 2  # VAD head whose class-0 probability > 0.5 means "end of turn" (spec §4.6)


class ServerError(RuntimeError):
    """The server refused the session or reported an error that ends it."""


class ConnectionLost(ConnectionError):
    """The server could not be reached, or the connection ended before the client was done
    (the server stopped, went away with 1001, or the network dropped). The message says which,
    in one line; it is an ``OSError``."""


def describe_close(url: str, code: int | None, reason: str = "") -> str:
    """One line for a connection that ended: who ended it and why."""
    why = f"{code}{': ' + reason if reason else ''}"
    if code is None or code == 1006:
        return (
            f"lost the connection to {url} (no close frame: the server stopped or the network "
            "dropped)"
        )
    if code == 1001:
        return f"the server at {url} went away ({why})"
    return f"the server at {url} closed the session ({why})"


def _closed(url: str, exc: websockets.ConnectionClosed) -> ConnectionLost:
    frame = exc.rcvd
    if frame is None:
        return ConnectionLost(describe_close(url, None))
    return ConnectionLost(describe_close(url, frame.code, frame.reason))


def _unreachable(url: str, exc: BaseException, open_timeout: float) -> ConnectionLost:
    if isinstance(exc, ConnectionRefusedError) or "Connect call failed" in str(exc):
        why = "connection refused: is a server running there? ('dsm-stt serve' starts one)"
    elif isinstance(exc, socket.gaierror):
        why = f"unknown host ({exc.strerror or exc})"
    elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        why = f"no answer within {open_timeout:g} s"
    elif isinstance(exc, websockets.InvalidURI):
        why = "not a WebSocket URL (ws://host:port/path or wss://...)"
    elif isinstance(exc, websockets.InvalidHandshake):
        why = f"not a WebSocket server ({exc})"
    else:
        why = str(exc) or type(exc).__name__
    return ConnectionLost(f"cannot connect to {url}: {why}")


class SttClient:
    """One streaming session. Use ``await SttClient.connect(url)`` (or ``async with``)."""

    def __init__(self, connection: Any) -> None:
        self._ws = connection
        self._pending: list[ServerMessage] = []  # read while waiting for Ready
        self.url = ""

    def ended(self) -> ConnectionLost:
        """Why the connection ended, once it has (for a caller that did not expect it to)."""
        code = getattr(self._ws, "close_code", None)
        return ConnectionLost(describe_close(self.url, code, getattr(self._ws, "close_reason", "")))

    @classmethod
    async def connect(
        cls,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        open_timeout: float = 10.0,
        end_of_turn: bool = False,
    ) -> SttClient:
        """Open a session. Raises ``ServerError`` when the server refuses it (HTTP 401,
        "no free channels"…), ``ConnectionLost`` when it cannot be reached.
        ``end_of_turn``: ask for ``EndOfTurn`` messages (``?end_of_turn=1``)."""
        headers = {"kyutai-api-key": api_key} if api_key is not None else None
        target = with_query(url, end_of_turn="1") if end_of_turn else url  # messages say url
        try:
            ws = await websockets.connect(
                target,
                additional_headers=headers,
                open_timeout=open_timeout,
                close_timeout=2.0,
                max_size=None,
            )
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            raise ServerError(f"{url}: HTTP {status}{': ' + body if body else ''}") from None
        except (
            OSError,
            asyncio.TimeoutError,
            websockets.InvalidURI,
            websockets.InvalidHandshake,
        ) as exc:
            raise _unreachable(url, exc, open_timeout) from None
        client = cls(ws)
        client.url = url
        try:
            first = await asyncio.wait_for(client._recv(), open_timeout)
        except websockets.ConnectionClosed as exc:
            await ws.close()
            raise _closed(url, exc) from None
        except BaseException:
            await ws.close()
            raise
        if isinstance(first, Error):
            await ws.close()
            raise ServerError(f"{url}: {first.message}")
        if not isinstance(first, Ready):  # moshi-server's non-batched module sends no Ready
            client._pending.append(first)
        return client

    async def __aenter__(self) -> SttClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ws.close()

    async def send_audio(self, pcm: np.ndarray | Iterable[float]) -> None:
        """24 kHz mono float samples in [-1, 1]; any length (80 ms blocks are best)."""
        await self._ws.send(encode_client_message(Audio(np.asarray(pcm, dtype=np.float32))))

    async def send_marker(self, marker_id: int) -> None:
        await self._ws.send(encode_client_message(Marker(marker_id)))

    async def send_flush(self, flush_id: int = 0) -> None:
        """Extension of this server: get every word of the audio sent so far, then
        ``Flushed(flush_id)``, without sending silence."""
        await self._ws.send(encode_client_message(Flush(flush_id)))

    async def send_init(self) -> None:
        """Restart the stream without reconnecting; the server answers ``Ready``."""
        await self._ws.send(encode_client_message(Init()))

    async def receive(self) -> ServerMessage:
        """The next message. Raises ``websockets.ConnectionClosed`` at the end."""
        if self._pending:
            return self._pending.pop(0)
        return await self._recv()

    def __aiter__(self) -> AsyncIterator[ServerMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[ServerMessage]:
        while True:
            try:
                yield await self.receive()
            except websockets.ConnectionClosedOK:
                return

    async def _recv(self) -> ServerMessage:
        while True:
            data = await self._ws.recv()
            if isinstance(data, str):
                continue  # no text messages in this protocol
            try:
                return decode_server_message(data)
            except ProtocolError as exc:
                raise ServerError(f"unexpected message from the server: {exc}") from exc


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` added to its query (replacing those of the same names)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k not in params]
    query += list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def stream_audio(
    url: str,
    pcm: np.ndarray,
    *,
    api_key: str | None = None,
    rtf: float = 1.0,
    marker_id: int = 0,
    max_tail_seconds: float = 40.0,
    end_of_turn: bool = False,
) -> AsyncIterator[ServerMessage]:
    """Send ``pcm`` (24 kHz mono) in 80 ms messages at ``rtf`` × real time, then a Marker and
    silence until the marker comes back; yield every message received before it
    (``EndOfTurn`` too, with ``end_of_turn``).

    ``Error`` messages from the server raise ``ServerError``; a connection that ends before the
    marker is back (the server stopped or went away, the network dropped) ``ConnectionLost``.
    If the marker has not come back after ``max_tail_seconds`` of silence (and a grace
    period), ``TimeoutError`` is raised.
    """
    if not rtf > 0:
        raise ValueError(f"rtf must be > 0, got {rtf!r}")
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    async with await SttClient.connect(url, api_key=api_key, end_of_turn=end_of_turn) as client:

        async def send() -> None:
            silence = np.zeros(FRAME_SIZE, dtype=np.float32)
            tail = [silence] * int(max_tail_seconds * SAMPLE_RATE / FRAME_SIZE)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i, frame in enumerate(_frames(pcm)):
                await asyncio.sleep(
                    max(0.0, start + i * FRAME_SIZE / SAMPLE_RATE / rtf - loop.time())
                )
                await client.send_audio(frame)
            await client.send_marker(marker_id)
            # The silence that lets the model catch up goes at most at real time: the marker
            # comes back after a few frames of it, and there is no point queueing seconds of
            # silence the server would have to chew through before closing.
            start, speed = loop.time(), min(rtf, 1.0)
            for i, frame in enumerate(tail):
                await asyncio.sleep(
                    max(0.0, start + i * FRAME_SIZE / SAMPLE_RATE / speed - loop.time())
                )
                await client.send_audio(frame)

        loop = asyncio.get_running_loop()
        sender = asyncio.create_task(send())
        deadline: float | None = None  # set once everything is sent
        try:
            while True:
                if deadline is None and sender.done():
                    try:
                        sender.result()  # a failed send ends the stream with its exception
                    except websockets.ConnectionClosed as exc:
                        raise _closed(url, exc) from None
                    deadline = loop.time() + _GRACE_SECONDS
                try:
                    msg = await asyncio.wait_for(client.receive(), 1.0)
                except websockets.ConnectionClosed as exc:
                    raise _closed(url, exc) from None
                except asyncio.TimeoutError:
                    if deadline is not None and loop.time() > deadline:
                        raise TimeoutError(
                            f"{url}: the end-of-stream marker never came back"
                        ) from None
                    continue
                if isinstance(msg, Error):
                    raise ServerError(msg.message)
                if isinstance(msg, Marker) and msg.id == marker_id:
                    return
                yield msg
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender


_GRACE_SECONDS = 10.0


def _frames(pcm: np.ndarray) -> list[np.ndarray]:
    return [pcm[i : i + FRAME_SIZE] for i in range(0, pcm.size, FRAME_SIZE)]


async def microphone(device: int | str | None = None) -> AsyncIterator[np.ndarray]:
    """80 ms blocks of 24 kHz mono float32 from the sound card (needs ``sounddevice``)."""
    sd = import_sounddevice()
    loop = asyncio.get_running_loop()
    blocks: asyncio.Queue[np.ndarray] = asyncio.Queue()

    def callback(indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        loop.call_soon_threadsafe(blocks.put_nowait, indata[:, 0].copy())

    with sd.InputStream(
        samplerate=SAMPLE_RATE,
        channels=1,
        dtype="float32",
        blocksize=FRAME_SIZE,
        device=device,
        callback=callback,
    ):
        while True:
            yield await blocks.get()


MIC_INSTALL = "pip install sounddevice (or, in a source checkout of dsm-stt, pip install '.[mic]')"
PORTAUDIO_INSTALL = (
    "install it: apt-get install libportaudio2 (Debian, Ubuntu), brew install portaudio (macOS)"
)


def import_sounddevice() -> Any:
    """The ``sounddevice`` module; ``ImportError`` with the command that fixes it when the
    package or the PortAudio library under it is missing."""
    try:
        import sounddevice
    except ImportError as exc:
        raise ImportError(
            f"the microphone needs the Python package 'sounddevice': {MIC_INSTALL}"
        ) from exc
    except OSError as exc:  # sounddevice is there, the PortAudio library is not
        raise ImportError(
            f"the microphone needs the PortAudio library, which sounddevice cannot find "
            f"({exc}); {PORTAUDIO_INSTALL}"
        ) from exc
    return sounddevice


class LivePrinter:
    """A live transcript for a terminal: words as they arrive; when the model's VAD says the
    speaker finished a turn, a pause mark and a new line (printed once per turn).

    The server's ``EndOfTurn`` messages say where turns end; until one has come (moshi-server
    sends none), the printer applies the same rule to the ``Step`` messages itself."""

    def __init__(self, out: TextIO = sys.stdout, vad_threshold: float = 0.5) -> None:
        self.out = out
        self.vad_threshold = vad_threshold
        self._in_turn = False
        self._server_turns = False  # the server sends EndOfTurn: Steps are not read

    def on_message(self, msg: ServerMessage) -> None:
        if isinstance(msg, Word):
            text = msg.text.strip()
            if text:
                self.out.write(("" if self._in_turn else "> ") + text + " ")
                self._in_turn = True
        elif isinstance(msg, EndOfTurn):
            self._server_turns = True
            self._end_turn()
        elif isinstance(msg, Step) and len(msg.prs) > END_OF_TURN_HEAD:
            if not self._server_turns and msg.prs[END_OF_TURN_HEAD] > self.vad_threshold:
                self._end_turn()
        elif isinstance(msg, EndWord | Marker):
            return
        self.out.flush()

    def _end_turn(self) -> None:
        if self._in_turn:
            self.out.write("[pause]\n")
            self._in_turn = False

    def close(self) -> None:
        if self._in_turn:
            self.out.write("\n")
            self._in_turn = False
        self.out.flush()
