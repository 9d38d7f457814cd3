"""The server application: app factory, lifespan, auth, graceful shutdown, and ``serve``.

Owns ``ServerContext`` (the state one app shares between its routes: config, metrics, the
engine and its runner, open sessions, the accepting/ready flags and the API-key check),
``create_app`` (a Starlette app whose lifespan loads the model if it was not given one, warms
it up with a few steps, starts the runner, and at the end drains and stops it), and ``serve``,
which runs the app under uvicorn with the shutdown moshi-server users expect: on SIGTERM or
SIGINT stop accepting, let every open session receive its last words, close, exit (a second
SIGINT exits at once).

Routes live in ``websocket.py`` and ``http.py``; the model and the engine are loaded through
``engine.Engine`` and ``model.checkpoint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from ..engine.scheduler import Scheduler
from . import http
from .config import ModelFiles, ServerConfig
from .metrics import ServerMetrics
from .runner import Runner, engine_thread
from .websocket import Session, asr_streaming

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..model.checkpoint import SttModel

log = logging.getLogger(__name__)


class ServerContext:
    """What the routes of one app share. Lives on the event loop; ``runner`` owns the model."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | None = None,
        metrics: ServerMetrics | None = None,
        torch_thread: Executor | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        # the one thread that loads, warms up and steps the engine (``runner.engine_thread``);
        # pass the one that built ``engine``
        self.torch_thread = torch_thread or engine_thread()
        self.metrics = metrics or ServerMetrics()
        self.runner: Runner = None  # type: ignore[assignment]  # set by start()
        self.sessions: set[Session] = set()
        self.accepting = False  # new sessions are welcome
        self.ready = False  # warmed up and not draining: what /health reports
        self._keys = tuple(key.encode() for key in config.api_keys)
        self._no_sessions: asyncio.Event | None = None
        self._drained = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving the app

    # -- model facts -------------------------------------------------------------------------

    @property
    def sample_rate(self) -> float:
        return self.runner.sample_rate

    @property
    def prefix_seconds(self) -> float:
        """Leading silence the checkpoint wants (spec §4.4); added by the POST route only."""
        assert self.engine is not None
        return float(self.engine.model.config.stt.audio_silence_prefix_seconds)

    # -- auth ----------------------------------------------------------------------------------

    def authorized(self, key: str | None) -> bool:
        """No configured keys: open server. Otherwise the key must be one of them."""
        if not self._keys:
            return True
        if key is None:
            return False
        given = key.encode()
        # Compare against every key (no early exit), in constant time per key.
        return any([hmac.compare_digest(given, k) for k in self._keys])

    # -- sessions ------------------------------------------------------------------------------

    def register(self, session: Session) -> None:
        self.sessions.add(session)
        if self._no_sessions is not None:
            self._no_sessions.clear()

    def unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions and self._no_sessions is not None:
            self._no_sessions.set()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load (if needed) and warm up the model, then start the runner."""
        self.loop = asyncio.get_running_loop()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        torch_thread = self.torch_thread
        if self.engine is None:
            self.engine = await self.loop.run_in_executor(torch_thread, load_engine, self.config)
        engine = self.engine
        await self.loop.run_in_executor(torch_thread, warm_up, engine, self.config.warmup_steps)
        cfg = engine.model.config
        scheduler = Scheduler(
            engine, cfg.stt.asr_delay_in_tokens, engine.decode, frame_rate=cfg.mimi.frame_rate
        )
        self.runner = Runner(scheduler, self.metrics)
        self.runner.start(torch_thread)
        self.accepting = self.ready = True
        log.info(
            "model %s ready: %d slots on %s (%s)",
            engine.name,
            engine.batch_size,
            engine.device,
            str(engine.dtype).removeprefix("torch."),
        )

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; every open session gets its last words and is closed."""
        self.accepting = self.ready = False
        if self._drained or self.runner is None:
            return
        self._drained = True
        for session in list(self.sessions):
            session.finish()
        if self.sessions and self._no_sessions is not None:
            wait = self.config.shutdown_timeout if timeout is None else timeout
            try:
                await asyncio.wait_for(self._no_sessions.wait(), wait)
            except asyncio.TimeoutError:
                log.warning("%d session(s) still open after %.0f s", len(self.sessions), wait)

    async def stop(self) -> None:
        await self.drain()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        self.torch_thread.shutdown(wait=False)


# --------------------------------------------------------------------------------------------
# loading


def load_engine(config: ServerConfig) -> Engine:
    """The engine ``config`` describes: a checkpoint by name or directory, the files of a
    moshi-server TOML, or (``random_weights``) either architecture with random weights."""
    from ..engine.engine import Engine

    ec = config.engine
    if config.model_files is None:
        return Engine.from_config(config.model, ec, random_weights=config.random_weights)
    device, dtype = ec.torch_device(), ec.torch_dtype()
    files = config.model_files
    if config.random_weights:
        from ..model.synthetic import random_model_for

        model = random_model_for(files.config, files.lm, dtype, device, ec.seed)
    else:
        model = load_model_files(files, dtype, device)
    return Engine.configured(model, ec)


def load_model_files(files: ModelFiles, dtype: Any, device: Any) -> SttModel:
    """Load a checkpoint given file by file (``hf://`` references are downloaded)."""
    from ..model.checkpoint import CheckpointFiles, load_files, resolve_path

    located = CheckpointFiles(
        files.lm,
        files.config,
        resolve_path(files.lm),
        resolve_path(files.mimi),
        resolve_path(files.tokenizer),
    )
    return load_files(located, dtype, device)


def warm_up(engine: Engine, steps: int) -> None:
    """Run a few steps on silence over every slot (allocations, kernels, caches); every
    stream resets its slot when it starts, so this leaves no trace."""
    B, F = engine.batch_size, engine.frame_size
    pcm = np.zeros((B, F), dtype=np.float32)
    everything = np.ones(B, dtype=bool)
    for _ in range(steps):
        engine.step(pcm, everything, everything)


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
    return app


def uvicorn_config(app: Starlette, config: ServerConfig) -> uvicorn.Config:
    """How uvicorn runs ``app``: keep-alive pings and frame limits come from ``config``."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        ws="websockets-sansio",
        ws_ping_interval=config.ping_interval or None,
        ws_ping_timeout=config.idle_timeout or None,
        # Frames up to twice our message limit reach the protocol and get an Error back;
        # bigger ones are refused by the WebSocket layer (close 1009).
        ws_max_size=2 * config.max_message_bytes,
        log_level=config.log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


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
