"""OpenAI's file transcription routes: ``POST /v1/audio/transcriptions``, ``GET /v1/models``.

Owns these routes as OpenAI documents them, so that the official SDKs (and the tools built on
them) transcribe with dsm-stt after a change of base URL and key; what the fields and answers
mean in OpenAI's terms is ``openai_shapes.py``. Here:

* auth: ``Authorization: Bearer KEY`` (the SDKs), or moshi-server's ``kyutai-api-key``
  header or ``auth_id`` query; 401 otherwise (when the server has keys);
* the upload: a multipart form parsed as it arrives (starlette's parser over the body
  stream; the file part spooled to a temporary file past 1 MiB, never whole in memory), the
  whole body within ``--max-upload-mb`` (413 as soon as it is passed);
* the transcription (``Transcription``): the file is opened before any slot is taken (400
  for what is not audio, 415 naming the codec for audio FFmpeg cannot decode), then it takes
  a file slot (``file_slots.FileSlots``: files leave part of the batch to live sessions) and
  an engine slot (503 when none frees within ``post_queue_timeout``), and is decoded
  progressively and fed at the model's pace while its words come back, as the moshi-style
  POST route does, while a ``turns.TurnDetector`` follows the VAD heads (its ends of turn
  cut the ``verbose_json`` segments). It is a session for the server's shutdown (which
  waits for its answer), and a client that leaves frees its slot at once;
* the answer, or with ``stream=true`` server-sent events as the words are decoded (a
  failure midway: an error event, which the SDKs raise).

Like the whole server layer it never touches a tensor: the runner owns the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..audio import AudioDecodeError, UnsupportedCodecError, iter_audio
from ..engine.events import Closed, EndWord, Step, Word
from ..engine.turns import EndOfTurn, TurnConfig, TurnDetector
from .openai_shapes import (
    ModelNames,
    OpenAIError,
    Result,
    TranscriptionRequest,
    Words,
    answer,
    delta_event,
    done_event,
    error_event,
    model_object,
    sse,
)
from .protocol import Error
from .runner import Dropped
from .websocket import request_key

if TYPE_CHECKING:
    from .context import ServerContext
    from .file_slots import FileSlots

T = TypeVar("T")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# the upload


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"request body over the upload limit of {limit / 2**20:g} MiB (--max-upload-mb)",
        param="file",
        code="file_too_large",
    )


async def _receive_form(request: Request, limit: int) -> FormData:
    """The multipart body, parsed as it streams in, within ``limit`` bytes."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(
            400,
            f"the body must be multipart/form-data (a 'file' part and fields), "
            f"got {content_type or 'no content type'!r}",
            code="invalid_content_type",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)

    async def body() -> AsyncIterator[bytes]:
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            yield part

    parser = MultiPartParser(request.headers, body(), max_files=1, max_fields=64)  # type: ignore[arg-type]
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise OpenAIError(400, f"malformed multipart body: {exc.message}") from exc


# --------------------------------------------------------------------------------------------
# one transcription


class _Failed:
    """Why the feeder stopped early: posted on the channel after the words so far."""

    def __init__(self, error: OpenAIError) -> None:
        self.error = error


class Transcription:
    """One uploaded file through one slot, from the request's first byte to its answer's last;
    registered with the server as a session from the start, so that a shutdown waits for its
    answer. ``close`` frees everything it holds, whatever happened."""

    def __init__(self, ctx: ServerContext, slots: FileSlots) -> None:
        self.ctx = ctx
        self.slots = slots
        self.runner = ctx.runner
        self.channel = self.runner.channel(max_pending=2**62)  # words are small: never dropped
        self.form: FormData | None = None  # closed with the transcription (its spooled file)
        self.samples = 0  # of the file's audio, fed so far
        self.steps = 0  # model steps the stream ran, once it is closed
        self._chunks: Iterator[np.ndarray] | None = None
        self._pending: np.ndarray | None = None  # the first chunk, decoded by ``open``
        self._slot = False
        self._admitted = False
        self._finished = False
        self._feeder: asyncio.Future[None] | None = None
        self._decoding: asyncio.Future[np.ndarray | None] | None = None
        self._closed = False
        # segments are also cut where the speaker's turn ended: Kyutai's rule, the pause head
        # of 2 s over 0.5 (``TurnConfig``'s defaults), on the words' clock
        frame_rate = self.runner.sample_rate / self.runner.frame_size
        self._turns: TurnDetector | None = TurnDetector(
            TurnConfig(), frame_rate, time_offset=ctx.prefix_seconds
        )
        self.turn_ends: list[float] = []
        ctx.register(self)

    def finish(self) -> None:
        """Shutdown: nothing to stop, the file is finite (``ServerContext.drain``)."""

    async def open(self, upload: UploadFile) -> None:
        """Check the audio before taking a slot: 400 for what does not decode, 415 for a
        codec without a decoder."""
        if upload.size == 0:
            raise OpenAIError(
                400, "the file is empty (0 bytes)", param="file", code="invalid_audio"
            )
        self._chunks = iter_audio(upload.file)
        self._pending = await run_in_threadpool(_next_chunk, self._chunks, upload.filename)

    async def start(self) -> bool:
        """Take a file slot and an engine slot (True), or raise a 503 if none frees in
        time."""
        timeout = self.ctx.config.post_queue_timeout
        deadline = time.monotonic() + timeout
        self._slot = await self.slots.acquire(self.runner.total_slots, timeout)
        if self._slot:
            left = max(0.0, deadline - time.monotonic())
            self._admitted = await self.runner.admit(
                self.channel, timeout=left, time_offset=self.ctx.prefix_seconds
            )
        if not self._admitted:
            self.ctx.metrics.reject("no_free_channels")
            raise OpenAIError(
                503,
                f"no free slot for a file within {timeout:g} s: the server is busy; retry later",
                code="no_free_slots",
            )
        self.ctx.metrics.connect.inc()  # a session, like a WebSocket's
        self._feeder = asyncio.ensure_future(self._feed())
        return True

    async def events(self) -> AsyncIterator[Word | EndWord]:
        """The file's words as the model decodes them; raises ``OpenAIError`` if it fails."""
        while True:
            for item in await self.channel.get():
                if isinstance(item, Word | EndWord):
                    self._turn(item)
                    yield item
                elif isinstance(item, Step):
                    self._turn(item)
                elif isinstance(item, Closed):
                    self._finished = True
                    self.steps = item.steps
                    return
                elif isinstance(item, _Failed):
                    raise item.error
                elif isinstance(item, Dropped):
                    self._finished = True
                    raise OpenAIError(500, item.reason, code="transcription_failed")
                elif isinstance(item, Error):  # pragma: no cover - the feeder sends nothing odd
                    raise OpenAIError(500, item.message, code="transcription_failed")

    async def result(self) -> Result:
        words = Words()
        async for event in self.events():
            words.add(event)
        return self.result_of(words)

    def result_of(self, words: Words) -> Result:
        seconds = round(self.samples / self.runner.sample_rate, 3)
        ends = tuple(self.turn_ends)
        return Result(words.timed(), seconds, self.steps, words.text_tokens, ends)

    def _turn(self, event: Step | Word | EndWord) -> None:
        """Follow the turns (models with enough VAD heads only: others send no Steps)."""
        if self._turns is None:
            return
        if isinstance(event, Step) and len(event.prs) < self._turns.config.heads_needed:
            self._turns = None  # too few heads for Kyutai's rule: pauses alone cut segments
            return
        for turn in self._turns.push(event):
            if isinstance(turn, EndOfTurn):
                self.turn_ends.append(turn.time)

    async def _feed(self) -> None:
        """Decode the rest of the file and feed it at the model's pace, then close the
        stream; a failure midway is posted after the words so far."""
        runner, channel = self.runner, self.channel
        assert self._chunks is not None
        max_backlog = round(self.ctx.config.max_buffered_seconds * runner.sample_rate)
        prefix = round(self.ctx.prefix_seconds * runner.sample_rate)
        if prefix > 0:
            runner.feed(channel, np.zeros(prefix, dtype=np.float32))
        chunk, self._pending = self._pending, None
        try:
            while chunk is not None:
                await channel.wait_for_room(max_backlog)
                self.samples += chunk.size
                runner.feed(channel, chunk)
                self._decoding = asyncio.ensure_future(
                    run_in_threadpool(_next_chunk, self._chunks, "file")
                )
                # shielded: a cancelled feeder leaves the decoder's thread call to finish, so
                # that ``close`` can wait for it before closing the decoder
                chunk = await asyncio.shield(self._decoding)
        except OpenAIError as exc:
            channel.post([_Failed(exc)])
            return
        except Exception as exc:  # a bug: the request fails, the server goes on
            log.exception("feeding an uploaded file failed")
            failure = OpenAIError(500, f"{type(exc).__name__}: {exc}", code="transcription_failed")
            channel.post([_Failed(failure)])
            return
        runner.close(channel)

    async def close(self) -> None:
        """Free the slots, the decoder and the upload; forget the session. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._feeder is not None:
                self._feeder.cancel()
            if self._decoding is not None:
                await asyncio.wait([self._decoding])
            if self._admitted and not self._finished:
                self.runner.remove(self.channel)  # the client left, or the decoding failed
            if self._slot:
                self.slots.release()
            if self._chunks is not None:
                # the generator's ``finally`` closes the container (in a thread: it may read)
                await run_in_threadpool(getattr(self._chunks, "close", lambda: None))
            if self.form is not None:
                await self.form.close()
        finally:
            self.ctx.unregister(self)


def _next_chunk(chunks: Iterator[np.ndarray], name: str | None) -> np.ndarray | None:
    try:
        return next(chunks, None)
    except AudioDecodeError as exc:
        raise _decode_error(exc, name or "file") from exc


def _decode_error(exc: AudioDecodeError, name: str) -> OpenAIError:
    """400 for what is not (or no longer) audio, 415 for audio without a decoder."""
    message = str(exc).replace("<stream>", name, 1)
    if isinstance(exc, UnsupportedCodecError):
        return OpenAIError(415, message, param="file", code="unsupported_codec")
    return OpenAIError(400, message, param="file", code="invalid_audio")


# --------------------------------------------------------------------------------------------
# the event stream


async def _event_stream(job: Transcription) -> AsyncIterator[bytes]:
    """``transcript.text.delta`` per word, then ``transcript.text.done``; a failure midway
    ends the stream with an error event."""
    collected = Words()
    try:
        async for event in job.events():
            text = collected.add(event)
            if text is not None:
                yield sse(delta_event(text, first=len(collected.words) == 1))
    except OpenAIError as exc:
        yield sse(error_event(exc))
        return
    yield sse(done_event(job.result_of(collected)))


class _EventStream(StreamingResponse):
    """Server-sent events that free the transcription when they end, however they end
    (finished, failed, or the client gone: starlette cancels the stream then)."""

    def __init__(self, job: Transcription, headers: Mapping[str, str]) -> None:
        super().__init__(
            _event_stream(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.job.close()


# --------------------------------------------------------------------------------------------
# routes


def _context(request: Request) -> ServerContext:
    return request.app.state.server


def authorized(ctx: ServerContext, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
    """``Authorization: Bearer KEY`` (OpenAI's SDKs), or moshi-server's key header / query;
    any one valid key is enough."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    keys = [token.strip()] if scheme.lower() == "bearer" and token.strip() else []
    other = request_key(headers, query)
    keys += [other] if other is not None else []
    return any(ctx.authorized(key) for key in keys) if keys else ctx.authorized(None)


def _refusal(ctx: ServerContext, request: Request) -> Response | None:
    """401 for a bad key, 503 while shutting down; None: go on."""
    if not authorized(ctx, request.headers, request.query_params):
        ctx.metrics.reject("unauthorized")
        error = OpenAIError(401, "missing or unknown API key", code="invalid_api_key")
        return error.response(headers={"WWW-Authenticate": "Bearer"})
    if not ctx.accepting:
        return OpenAIError(503, "the server is shutting down", code="shutting_down").response()
    return None


async def transcriptions(request: Request) -> Response:
    """``POST /v1/audio/transcriptions``."""
    ctx = _context(request)
    refused = _refusal(ctx, request)
    if refused is not None:
        return refused
    job = Transcription(ctx, request.app.state.file_slots)
    streaming = False
    try:
        job.form = await _receive_form(request, ctx.config.max_upload_bytes)
        req = TranscriptionRequest.parse(job.form, ModelNames.of(ctx.engine.name))
        upload = job.form["file"]
        assert isinstance(upload, UploadFile)  # parse checked it
        await job.open(upload)
        if not await _unless_disconnected(request, job.start()):
            return Response(status_code=499)  # nobody reads it
        if req.stream:
            streaming = True  # the event stream closes the transcription
            return _EventStream(job, req.headers)
        result = await _unless_disconnected(request, job.result())
        if result is None:
            return Response(status_code=499)
        return answer(req, result, ctx.config.engine.temperature)
    except OpenAIError as exc:
        return exc.response()
    except ClientDisconnect:  # the client left (or its body stalled) before the end
        return Response(status_code=499)
    finally:
        if not streaming:
            await job.close()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) once the client of ``request``, whose
    body was read, disconnects."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the loaded checkpoint."""
    ctx = _context(request)
    refused = _refusal(ctx, request)
    if refused is not None:
        return refused
    models = ModelNames.of(ctx.engine.name)
    return JSONResponse({"object": "list", "data": [model_object(models)]})


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{model}``: the loaded checkpoint, under any name it answers to."""
    ctx = _context(request)
    refused = _refusal(ctx, request)
    if refused is not None:
        return refused
    models = ModelNames.of(ctx.engine.name)
    name = request.path_params["model"]
    if models.resolve(name) is None:
        message = f"model {name!r} is not loaded; this server runs {models.id!r}"
        return OpenAIError(404, message, param="model", code="model_not_found").response()
    return JSONResponse(model_object(models))
