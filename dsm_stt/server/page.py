"""The browser page: a live transcript of the microphone, files, subtitles, at ``/``.

Owns the routes of the page whose files ship in ``page/`` (package data: plain HTML, CSS and
JavaScript modules, no build step and nothing fetched from elsewhere, so it works offline):

* ``GET /`` (unless the operator serves a ``static_dir`` there, as moshi-server allows) and
  ``GET /page/``: the HTML; ``GET /page/{file}``: its scripts and style, each with its content
  type. Only the files of ``page/`` are served, read once.
* ``GET /page-config.json``: what the page must know about this server: the WebSocket's path,
  whether a key is needed, the file route, the model's frame and delay, and whether it has
  the VAD head whose ends of turn (the opt-in ``EndOfTurn`` message) the page shows.
* ``GET /page/key``: 204 when the key (``kyutai-api-key`` header or ``auth_id`` query) is
  accepted, 401 otherwise. A browser never sees the status of a refused WebSocket upgrade,
  so the page asks here why its connection failed.
* ``POST /page/render?format=srt|vtt|json``: the words the page holds (from the microphone or
  a file) as ``dsm-stt transcribe`` writes them, through ``writers.py``: the page's subtitles
  are cut by the same rules as every other subtitle this package writes.

The page's own logic (capture, resampling to 24 kHz, MessagePack, the transcript) is in the
JavaScript; nothing here touches audio.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from .. import __version__
from ..writers import TimedWord, Transcript, TranscriptError, render
from .openai_shapes import ModelNames
from .websocket import END_OF_TURN_HEAD, END_OF_TURN_THRESHOLD, request_key

if TYPE_CHECKING:
    from .config import ServerConfig
    from .context import ServerContext

OPENAI_FILE_ROUTE = "/v1/audio/transcriptions"
MAX_RENDER_BYTES = 16 * 2**20  # a transcript to render: some 200 hours of words
# what the page's files are served as (anything else in the folder is not served)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_RENDERED = {
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "json": "application/json",
}
# Scripts and styles from this server only; the socket and the uploads go to it too (CSP's
# 'self' covers ws:/wss: to the same host); downloads are blob: URLs.
_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; media-src 'self' blob:; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": _POLICY,
    "Referrer-Policy": "no-referrer",
}


class PageFiles:
    """The files of ``page/``, read once: name → (bytes, content type)."""

    def __init__(self) -> None:
        folder = resources.files(__package__).joinpath("page")
        self.files: dict[str, tuple[bytes, str]] = {}
        for entry in folder.iterdir():
            kind = _TYPES.get("." + entry.name.rpartition(".")[2])
            if entry.is_file() and kind is not None:
                self.files[entry.name] = (entry.read_bytes(), kind)

    def response(self, name: str) -> Response:
        found = self.files.get(name)
        if found is None:
            return PlainTextResponse(f"no such page file: {name}", 404)
        body, kind = found
        return Response(body, media_type=kind, headers=_HEADERS)


def routes(config: ServerConfig) -> list[BaseRoute]:
    """The page's routes; ``/`` only when the operator does not serve a ``static_dir``."""
    files = PageFiles()

    async def index(request: Request) -> Response:
        return files.response("index.html")

    async def asset(request: Request) -> Response:
        return files.response(request.path_params["name"])

    out: list[BaseRoute] = [
        Route("/page/", index),
        Route("/page/key", key_check),
        Route("/page/render", render_transcript, methods=["POST"]),
        Route("/page/{name}", asset),
        Route("/page-config.json", page_config),
    ]
    if not config.static_dir:
        out.insert(0, Route("/", index))
    return out


def _context(request: Request) -> ServerContext:
    return request.app.state.server


async def page_config(request: Request) -> Response:
    """``GET /page-config.json``."""
    ctx = _context(request)
    config, engine = ctx.config, ctx.engine
    assert engine is not None  # routes run after the lifespan loaded it
    stt = engine.model.config.stt
    frame_rate = engine.model.config.mimi.frame_rate
    body: dict[str, Any] = {
        "version": __version__,
        "model": ModelNames.of(engine.name).id,  # as /v1/models names it (no server paths)
        "ws_path": config.path,
        "auth_required": bool(config.api_keys),
        "file_route": OPENAI_FILE_ROUTE,  # it streams a file's words as they come
        "sample_rate": round(ctx.sample_rate),
        "frame_size": engine.frame_size,
        "frame_rate": frame_rate,
        "delay_seconds": stt.asr_delay_in_tokens / frame_rate,
        # the meter shows head END_OF_TURN_HEAD; the server decides the turns (``EndOfTurn``,
        # asked for with ``?end_of_turn=1``) by Kyutai's rule on it
        "vad": ctx.vad_heads > END_OF_TURN_HEAD,
        "end_of_turn": {"head": END_OF_TURN_HEAD, "threshold": END_OF_TURN_THRESHOLD},
        "max_upload_mb": config.max_upload_mb,
    }
    return JSONResponse(body, headers={"Cache-Control": "no-cache"})


async def key_check(request: Request) -> Response:
    """``GET /page/key``: is the key this request carries one the server accepts?"""
    if _context(request).authorized(request_key(request.headers, request.query_params)):
        return Response(status_code=204)
    return PlainTextResponse("unauthorized: missing or unknown API key", 401)


async def render_transcript(request: Request) -> Response:
    """``POST /page/render?format=…`` with ``{"words": [{"text", "start", "end"}], "duration",
    "model"}``: the transcript as ``dsm-stt transcribe --format …`` writes it."""
    ctx = _context(request)
    if not ctx.authorized(request_key(request.headers, request.query_params)):
        return PlainTextResponse("unauthorized: missing or unknown API key", 401)
    fmt = request.query_params.get("format", "")
    if fmt not in _RENDERED:
        return PlainTextResponse(f"format must be one of {', '.join(_RENDERED)}", 400)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_RENDER_BYTES:
        return PlainTextResponse("transcript too large", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_RENDER_BYTES:
            return PlainTextResponse("transcript too large", 413)
    try:
        transcript = transcript_of(json.loads(body))
    except (ValueError, TypeError, KeyError) as exc:  # TranscriptError is a ValueError
        return PlainTextResponse(f"not a transcript: {exc}", 400)
    return Response(render(transcript, fmt), media_type=_RENDERED[fmt])


def transcript_of(data: Any) -> Transcript:
    """The page's JSON transcript as a ``Transcript``; raises ValueError naming what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("words"), list):
        raise ValueError("expected an object with a 'words' list")
    words = []
    for item in data["words"]:
        text, start, end = item["text"], item["start"], item.get("end")
        if not isinstance(text, str) or not _number(start) or not (end is None or _number(end)):
            raise ValueError(f"bad word {item!r}")
        words.append(TimedWord(text.strip(), float(start), None if end is None else float(end)))
    words = [w for w in words if w.text]
    duration = data.get("duration", 0.0)
    if not _number(duration):
        raise ValueError("duration must be a number")
    last = max((w.end or w.start for w in words), default=0.0)
    model = data.get("model")
    try:
        return Transcript(
            " ".join(w.text for w in words),
            words,
            max(float(duration), last),
            model if isinstance(model, str) else "",
        )
    except TranscriptError as exc:
        raise ValueError(str(exc)) from exc


def _number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
