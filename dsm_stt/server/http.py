"""The HTTP routes: whole-file transcription, build and module info, health, metrics.

Owns the request handlers next to the WebSocket endpoint (spec §5.1, §5.7, §5.8):

* ``POST /api/asr-streaming`` — the body is an audio file in any format FFmpeg reads; the answer
  is moshi-server's: a JSON list of ``{"type": "Word", "text", "start_time"}`` and
  ``{"type": "EndWord", "stop_time"}`` objects. Header auth only (``kyutai-api-key``), as
  moshi-server. Unlike moshi-server's 2 MB, the body limit is ``--max-upload-mb`` (413 beyond):
  the body is spooled (to a temporary file past 16 MiB, never whole in memory), decoded
  progressively and fed to the stream at the model's pace, and the trailing silence is the
  scheduler's close padding rather than 10 s of zeros. A client that disconnects stops its
  transcription and frees its slot at once. The checkpoint's silence prefix (1 s for
  the 2.6B) is added and subtracted again, so times are in file time. Files share the
  slots with live sessions as ``file_slots.py`` says (at most ``--max-file-slots``).
* ``GET /api/build_info``, ``GET /api/modules_info`` (slot usage, moshi-server's field names,
  values as strings), ``GET /health`` (200 only once the model is warmed up and while the
  server accepts sessions; with this package's version), ``GET /metrics`` (Prometheus text).
"""

from __future__ import annotations

import asyncio
import platform
import sys
import tempfile
from collections.abc import Awaitable
from importlib import metadata
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..audio import AudioDecodeError, iter_audio
from ..engine.events import Closed, EndWord, Word
from .protocol import Error
from .runner import Dropped

if TYPE_CHECKING:
    from .context import ServerContext
    from .file_slots import FileSlots

T = TypeVar("T")
_IN_MEMORY = 16 * 2**20  # an upload past this spills to a temporary file


def _context(request: Request) -> ServerContext:
    return request.app.state.server


class _ClientGone(Exception):
    """The client of a POST disconnected: stop, free the slot, answer nobody."""


class _Post:
    """A running POST as the server's shutdown sees it: drained like a WebSocket session
    (waited for until it has answered), with nothing to stop, as it reads no more than its
    body."""

    def finish(self) -> None:
        pass


async def asr_post(request: Request) -> Response:
    """Transcribe a whole audio file sent as the request body."""
    ctx = _context(request)
    if not ctx.authorized(request.headers.get("kyutai-api-key")):
        ctx.metrics.reject("unauthorized")
        return PlainTextResponse("unauthorized: missing or unknown API key", 401)
    if not ctx.accepting:
        return JSONResponse({"error": "the server is shutting down"}, 503)
    post = _Post()
    ctx.register(post)  # SIGTERM waits for this answer, as for WebSocket sessions
    try:
        return await _receive_and_transcribe(ctx, request)
    finally:
        ctx.unregister(post)


async def _receive_and_transcribe(ctx: ServerContext, request: Request) -> Response:
    limit = ctx.config.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _too_large(limit)
    # spooled, never held whole in memory
    with tempfile.SpooledTemporaryFile(max_size=_IN_MEMORY) as body:
        size = 0
        try:
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    return _too_large(limit)
                await run_in_threadpool(body.write, part)
        except ClientDisconnect:  # the client left (or its body stalled) before the end
            return Response(status_code=499)
        if size == 0:
            return JSONResponse({"error": "empty request body: POST an audio file"}, 400)
        body.seek(0)
        gone = asyncio.ensure_future(_disconnect(request))
        slots: FileSlots = request.app.state.file_slots  # files leave slots to live sessions
        try:
            wait = ctx.config.post_queue_timeout
            if not await _unless_gone(gone, slots.acquire(ctx.runner.total_slots, wait)):
                ctx.metrics.reject("no_free_channels")
                return JSONResponse({"error": "no free channels"}, 503)
            try:
                return await _transcribe(ctx, body, gone)
            finally:
                slots.release()
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it: the slot is free already
        finally:
            gone.cancel()


async def _transcribe(ctx: ServerContext, body: BinaryIO, gone: asyncio.Future) -> Response:
    runner = ctx.runner
    channel = runner.channel(max_pending=sys.maxsize)
    prefix = ctx.prefix_seconds
    admitted = await _unless_gone(
        gone, runner.admit(channel, timeout=ctx.config.post_queue_timeout, time_offset=prefix)
    )
    if not admitted:
        ctx.metrics.reject("no_free_channels")
        return JSONResponse({"error": "no free channels"}, 503)
    ctx.metrics.connect.inc()  # a session, like a WebSocket's
    max_backlog = round(ctx.config.max_buffered_seconds * runner.sample_rate)
    finished = False
    try:
        if prefix > 0:
            runner.feed(channel, np.zeros(round(prefix * runner.sample_rate), dtype=np.float32))
        chunks = iter_audio(body)
        while True:
            try:
                chunk = await _unless_gone(gone, run_in_threadpool(next, chunks, None))
            except AudioDecodeError as exc:
                return JSONResponse({"error": str(exc)}, 400)
            if chunk is None:
                break
            await _unless_gone(gone, channel.wait_for_room(max_backlog))
            runner.feed(channel, chunk)
        runner.close(channel)
        words: list[dict[str, object]] = []
        while True:
            for item in await _unless_gone(gone, channel.get()):
                if isinstance(item, Word):
                    words.append({"type": "Word", "text": item.text, "start_time": item.start_time})
                elif isinstance(item, EndWord):
                    words.append({"type": "EndWord", "stop_time": item.stop_time})
                elif isinstance(item, Error):
                    words.append({"type": "Error", "message": item.message})
                elif isinstance(item, Dropped):
                    finished = True
                    return JSONResponse({"error": item.reason}, 500)
                elif isinstance(item, Closed):
                    finished = True
                    return JSONResponse(words)
    finally:
        if not finished:
            runner.remove(channel)


def _too_large(limit: int) -> Response:
    return JSONResponse(
        {"error": f"request body over the upload limit of {limit / 2**20:g} MiB (--max-upload-mb)"},
        413,
    )


async def _disconnect(request: Request) -> None:
    """Returns when the client of ``request`` (whose body was read) disconnects."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(gone: asyncio.Future, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or ``_ClientGone`` as soon as ``gone`` is done."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    raise _ClientGone


async def build_info(request: Request) -> Response:
    ctx = _context(request)
    engine = ctx.engine
    info: dict[str, object] = {
        "name": "dsm-stt",
        "version": __version__,
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "platform": platform.platform(),
    }
    if engine is not None:
        info |= {
            "model": engine.name,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "batch_size": engine.batch_size,
        }
    return JSONResponse(info)


async def modules_info(request: Request) -> Response:
    ctx = _context(request)
    files = ctx.config.model_files
    if files is not None:
        lm, audio_tokenizer = files.lm, files.mimi
    else:
        name = ctx.engine.name if ctx.engine is not None else ctx.config.model
        mimi = ctx.engine.model.config.mimi_name if ctx.engine is not None else ""
        lm, audio_tokenizer = name, f"{name}/{mimi}"
    runner = ctx.runner
    return JSONResponse(
        [
            {
                "type": "batched_asr",
                "path": ctx.config.path,
                "lm": lm,
                "audio_tokenizer": audio_tokenizer,
                "used_slots": str(runner.used_slots if runner is not None else 0),
                "total_slots": str(runner.total_slots if runner is not None else 0),
            }
        ]
    )


async def health(request: Request) -> Response:
    ctx = _context(request)
    if ctx.ready:
        return JSONResponse({"status": "ok", "version": __version__})
    status = "starting" if ctx.runner is None else "shutting down"
    return JSONResponse({"status": status, "version": __version__}, 503)


async def metrics(request: Request) -> Response:
    ctx = _context(request)
    return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
