"""What the routes of one server app share: ``ServerContext``, and how its engine is loaded.

Owns ``ServerContext`` (config, metrics, the engine and its runner, the open sessions, the
accepting / ready flags and the API-key check; its lifespan: load, warm up, start, drain,
stop), ``load_engine`` (the engine a ``ServerConfig`` describes, through
``loading.load_engine``) and ``warm_up``. The routes (``websocket.py``, ``http.py``) and the
app factory (``app.py``) import it; it imports none of them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..engine.scheduler import Scheduler
from .accept_errors import AcceptErrorLog
from .config import ServerConfig
from .metrics import ServerMetrics
from .runner import ReadAhead, Runner, engine_thread

if TYPE_CHECKING:
    from ..engine.engine import Engine

log = logging.getLogger("dsm_stt.server.app")


class Session(Protocol):
    """An open session as the context sees it (``websocket.Session``, the POST route's)."""

    def finish(self) -> None: ...


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
        self._lag_watch: asyncio.Future[None] | None = None
        self.read_ahead = ReadAhead(floor=0, budget=0)  # sized in ``start``
        self.accept_errors = AcceptErrorLog(on_failure=self.metrics.accept_failures.inc)

    # -- model facts -------------------------------------------------------------------------

    @property
    def sample_rate(self) -> float:
        return self.runner.sample_rate

    @property
    def vad_heads(self) -> int:
        """How many VAD heads the model has (0: no Step messages, no turn detection)."""
        assert self.engine is not None
        return int(self.engine.model.config.lm.extra_heads_num_heads)

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
        rate = self.runner.sample_rate
        self.read_ahead = ReadAhead(
            floor=round(self.config.max_buffered_seconds * rate),
            budget=round(self.config.read_ahead_mb * 2**20 / 4),  # float32 samples
        )
        self._lag_watch = asyncio.ensure_future(self._watch_loop_lag())
        self.accept_errors.install(self.loop)
        self.accepting = self.ready = True
        log.info(
            "model %s ready: %d slots, %s",
            engine.name,
            engine.batch_size,
            engine.plan.describe(reason=False),
        )

    async def _watch_loop_lag(self, period: float = 0.05) -> None:
        """Measure how late the event loop runs a ``period`` timer (``asr_event_loop_lag``):
        CPU-heavy work on the loop would show here, and stall every session."""
        loop, worst = asyncio.get_running_loop(), 0.0
        while True:
            start = loop.time()
            await asyncio.sleep(period)
            lag = max(loop.time() - start - period, 0.0)
            self.metrics.loop_lag.observe(lag)
            if lag > worst:
                worst = lag
                self.metrics.loop_lag_max.set(lag)

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
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        self.accept_errors.uninstall()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        self.torch_thread.shutdown(wait=False)


# --------------------------------------------------------------------------------------------
# loading


def load_engine(config: ServerConfig) -> Engine:
    """The engine ``config`` describes: a checkpoint by name or directory, the files of a
    moshi-server TOML, or (``random_weights``) either architecture with random weights."""
    from ..loading import load_engine as load

    source = config.model if config.model_files is None else config.model_files
    return load(source, config.engine, config.random_weights, announce=log.info)


def warm_up(engine: Engine, steps: int) -> None:
    """Run a few steps on silence over every slot (allocations, kernels, caches); every
    stream resets its slot when it starts, so this leaves no trace."""
    B, F = engine.batch_size, engine.frame_size
    pcm = np.zeros((B, F), dtype=np.float32)
    everything = np.ones(B, dtype=bool)
    for _ in range(steps):
        engine.step(pcm, everything, everything)
