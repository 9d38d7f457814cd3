"""The server application: app factory, lifespan, auth, graceful shutdown, and ``serve``.

Owns ``create_app`` (a Starlette app whose lifespan loads the model if it was not given one,
warms it up with a few steps, starts the runner, and at the end drains and stops it, through
the ``ServerContext`` of ``context.py`` that its routes share), and ``serve``,
which runs the app under uvicorn with the shutdown moshi-server users expect: on SIGTERM or
SIGINT stop accepting, let every open session receive its last words, close, exit (a second
SIGINT exits at once).

Routes live in ``websocket.py``, ``http.py``, ``openai_files.py`` and ``page.py`` (the
browser page); the model and the engine are loaded through ``loading.load_engine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from . import deadlines, http, openai_files, page, redaction
from .config import ServerConfig
from .context import ServerContext, load_engine, warm_up
from .file_slots import FileSlots
from .liveness import protocol_class
from .metrics import ServerMetrics
from .realtime import realtime_endpoint
from .websocket import asr_streaming

if TYPE_CHECKING:
    from ..engine.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["ServerContext", "create_app", "load_engine", "serve", "warm_up"]


# --------------------------------------------------------------------------------------------
# the app


def create_app(
    config: ServerConfig,
    engine: Engine | None = None,
    metrics: ServerMetrics | None = None,
    torch_thread: Executor | None = None,
) -> Starlette:
    """The ASGI app. Without ``engine`` the lifespan loads the one ``config`` describes;
    ``torch_thread``: the executor that built ``engine`` (it will also step it)."""
    context = ServerContext(config, engine, metrics, torch_thread)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await context.start()
        try:
            yield
        finally:
            await context.stop()

    routes: list[BaseRoute] = [
        WebSocketRoute(config.path, asr_streaming),
        Route(config.path, http.asr_post, methods=["POST"]),
        Route("/api/build_info", http.build_info),
        Route("/api/modules_info", http.modules_info),
        Route("/health", http.health),
        Route("/metrics", http.metrics),
        Route("/v1/audio/transcriptions", openai_files.transcriptions, methods=["POST"]),
        Route("/v1/models", openai_files.list_models),
        Route("/v1/models/{model:path}", openai_files.get_model),
        WebSocketRoute("/v1/realtime", realtime_endpoint),  # OpenAI's Realtime transcription
        *page.routes(config),  # the browser page at / (unless static_dir takes /)
    ]
    if config.static_dir:
        static = Path(config.static_dir)
        if static.is_dir():
            from starlette.staticfiles import StaticFiles

            routes.append(Mount("/", StaticFiles(directory=static, html=True)))
        else:
            log.warning("static_dir %s is not a directory: not serving static files", static)
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = context
    # the file routes' share of the slots (both POST routes count against it)
    app.state.file_slots = FileSlots(config.max_file_slots, context.metrics.file_slots.set)
    return app


def uvicorn_config(app: Starlette, config: ServerConfig) -> uvicorn.Config:
    """How uvicorn runs ``app``: keep-alive pings and frame limits come from ``config``; its
    request lines never show a key."""
    settings = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        ws=protocol_class(),  # keep-alive that never drops a client that is sending
        http=deadlines.protocol_class(config.header_timeout, config.body_timeout),
        ws_ping_interval=config.ping_interval or None,
        ws_ping_timeout=config.idle_timeout or None,
        # Frames up to twice our message limit reach the protocol and get an Error back;
        # bigger ones are refused by the WebSocket layer (close 1009).
        ws_max_size=2 * config.max_message_bytes,
        ws_per_message_deflate=config.ws_compression,
        log_level=config.log_level,
        lifespan="on",
        # asyncio's own loop, also where uvloop is installed (Ray brings it): the limits and
        # their tests (accept failures at fd exhaustion, write buffers) are asyncio's behaviour
        loop="asyncio",
        timeout_graceful_shutdown=5,
        # every open connection counts (idle sockets too): newcomers past it get 503
        limit_concurrency=config.max_connections,
    )
    redaction.install()  # after uvicorn.Config, which configures its loggers
    return settings


def serve(
    config: ServerConfig,
    engine: Engine | None = None,
    torch_thread: Executor | None = None,
) -> int:
    """Run the server until SIGTERM/SIGINT; 0 after a clean shutdown, 1 if startup failed.
    ``torch_thread``: see ``create_app``."""
    app = create_app(config, engine, torch_thread=torch_thread)
    server = GracefulServer(uvicorn_config(app, config), app.state.server)
    server.run()
    return 0 if server.started else 1


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a first signal that drains the sessions before shutting down
    (uvicorn alone closes open WebSockets with 1012 at once). A second signal, or one that
    arrives before the model is ready, exits at once."""

    def __init__(self, config: uvicorn.Config, context: ServerContext) -> None:
        super().__init__(config)
        self.context = context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: runs in the main thread, between two steps of the event loop.
        # Unlike uvicorn's, it does not re-raise the signal after shutdown: exit status 0.
        if self._draining is not None or self._loop is None or not self.context.ready:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        log.info("signal %d: finishing %d open session(s)", sig, len(self.context.sessions))
        self._draining = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.context.drain()
        finally:
            self.should_exit = True
