"""The one place asyncio meets torch: a worker thread that owns the engine and the scheduler.

Owns ``Runner``, ``Channel``, ``ReadAhead`` and ``engine_thread``. The ``Scheduler`` (and through it the
engine) is not thread-safe, so exactly one thread touches it: the runner's worker. Sessions,
which live on the asyncio event loop, talk to it through a command queue (admit / feed /
marker / flush / reset / close / remove: cheap, non-blocking calls from any thread) and receive
what their stream produced on their ``Channel``: the worker hands each channel one batch of
messages per model step with ``loop.call_soon_threadsafe`` into the channel's
``asyncio.Queue``.

The worker sleeps on a condition variable until a command arrives or a stream has a full frame
(no polling), then runs: apply commands → one scheduler tick (one batched model step) → route
events → finish the step (``Scheduler.settle``: its Mimi half, which the messages do not need,
so they leave that much earlier). It never waits on a client: a session that does not read its
messages only grows its own queue, and past ``max_pending`` messages the channel calls its
``on_overflow`` hook so the session can be dropped (others never notice). Audio coming in
faster than the model consumes it is bounded the other way: ``Channel.wait_for_room`` (and
``ReadAhead``, which lets sessions read further within a server-wide budget) lets a session
stop reading its socket while its stream has more than a given backlog, which pushes back on
the client through TCP.

All of a server's torch work (loading, warm-up, every step) runs on one thread, the executor
``engine_thread()`` makes: PyTorch's CPU kernels run on OpenMP, which keeps a team of worker
threads for every thread that ever ran one, and once a process has more OpenMP threads than
cores, GNU OpenMP makes idle workers sleep almost at once, so every parallel region pays a
wake-up (a stt-1b batch-1 step measured 99 ms instead of 77 ms when the model was built on
another thread than the one stepping it).

The scheduler answers flushes (``Flushed``) and resets (``Restarted``, sent as ``Ready``) in
its streams' own steps; the runner only routes them. Step durations (the whole tick, and the
engine call within it) go to the metrics from here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.events import Closed, Event, Restarted
from ..engine.scheduler import Scheduler, SchedulerError
from .metrics import ServerMetrics
from .protocol import Error, Ready

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Dropped:
    """Last message of a stream the runner gave up (model failure, runner stopped)."""

    reason: str


Outbound = Event | Ready | Error | Dropped


class Channel:
    """One session's side of the runner; created (and read) on the session's event loop.

    ``buffered`` (samples queued in the scheduler after the last step) is written by the worker
    and ``inflight`` (samples in feed commands not yet applied) under the runner's lock; both
    are plain ints, read without locking for back-pressure, which only needs to be roughly
    right.
    """

    _ids = itertools.count()

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_pending: int,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.id = next(Channel._ids)
        self.loop = loop
        self.max_pending = max_pending
        self.on_overflow = on_overflow
        self.pending = 0  # messages queued and not yet taken by ``get``
        self.overflowed = False
        self.buffered = 0
        self.inflight = 0
        self.wants_progress = False
        self._queue: asyncio.Queue[list[object]] = asyncio.Queue()
        self._progress = asyncio.Event()
        # Owned by the worker thread.
        self.admitted = False
        self.done = False  # the stream has left the scheduler

    # -- event-loop side ---------------------------------------------------------------------

    def post(self, batch: list[object]) -> None:
        """Queue messages for the session (event-loop thread only)."""
        self._progress.set()
        if self.overflowed or not batch:
            return
        self.pending += len(batch)
        self._queue.put_nowait(batch)
        if self.pending > self.max_pending:
            self.overflowed = True
            if self.on_overflow is not None:
                self.on_overflow()

    async def get(self) -> list[object]:
        """The next batch of messages, in order."""
        batch = await self._queue.get()
        self.pending -= len(batch)
        return batch

    def backlog(self) -> int:
        """Samples of this stream waiting for the model (queued or on their way)."""
        return self.buffered + self.inflight

    async def wait_for_room(self, max_samples: int) -> None:
        """Return once at most ``max_samples`` samples wait for the model."""
        while self.backlog() > max_samples:
            await self.wait_for_progress()

    async def wait_for_progress(self) -> None:
        """Return after this stream's next model step (or a second, whichever comes first)."""
        self._progress.clear()
        self.wants_progress = True
        # The worker wakes us after every step; the timeout only guards a lost wake-up.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._progress.wait(), 1.0)

    def _wake(self) -> None:
        self._progress.set()


class ReadAhead:
    """How far ahead of the model the sessions read their clients' audio (event-loop side).

    Every session may have ``floor`` samples waiting for the model. Beyond that it goes on
    reading while the audio of all sessions beyond their floors fits ``budget`` samples; then
    it stops reading its socket (TCP flow control) until the model catches up. Reading ahead is
    what keeps a client that sends as fast as it can *and pings* connected: its ping waits in
    the socket behind its audio, so a server that does not read cannot answer it, and the
    websockets library such clients use gives up 40 s after an unanswered ping. The budget
    bounds what all of them together can make the server hold.
    """

    def __init__(self, floor: int, budget: int) -> None:
        self.floor = floor
        self.budget = budget
        self.channels: set[Channel] = set()

    def extra(self) -> int:
        """Samples waiting beyond the sessions' floors, all sessions together."""
        return sum(max(0, ch.backlog() - self.floor) for ch in self.channels)

    def has_room(self, channel: Channel, samples: int) -> bool:
        backlog = channel.backlog()
        if backlog <= self.floor:
            return True
        return self.extra() + samples <= self.budget

    async def wait_for_room(self, channel: Channel, samples: int) -> None:
        """Return once ``samples`` more may be queued for ``channel``."""
        while not self.has_room(channel, samples):
            await channel.wait_for_progress()


class EngineThread(concurrent.futures.Executor):
    """One daemon thread that runs the submitted calls in order: all the torch work of one
    server (see the module docstring). A daemon, unlike ``ThreadPoolExecutor``'s workers, so
    that Ctrl-C during a long model download exits at once instead of waiting for it."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future, Callable, tuple] | None]
        self._calls = queue.SimpleQueue()
        self._shutdown = False
        self._thread = threading.Thread(target=self._run, name="dsm-stt-engine", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        if self._shutdown:
            raise RuntimeError("the engine thread is shut down")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, functools.partial(fn, **kwargs), args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if not self._shutdown:
            self._shutdown = True
            self._calls.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)


def engine_thread() -> EngineThread:
    """A new ``EngineThread``."""
    return EngineThread()


@dataclass(frozen=True, slots=True)
class _Admit:
    channel: Channel
    future: concurrent.futures.Future[bool]
    deadline: float  # time.monotonic() until which the channel may wait for a slot
    time_offset: float | None


@dataclass(frozen=True, slots=True)
class _Feed:
    channel: Channel
    pcm: np.ndarray


@dataclass(frozen=True, slots=True)
class _Marker:
    channel: Channel
    marker_id: int


@dataclass(frozen=True, slots=True)
class _Flush:
    channel: Channel
    flush_id: int


@dataclass(frozen=True, slots=True)
class _Reset:
    channel: Channel


@dataclass(frozen=True, slots=True)
class _Close:
    channel: Channel


@dataclass(frozen=True, slots=True)
class _Remove:
    channel: Channel


# What a session asks of the worker, queued in order and applied on the worker thread
_Command = _Admit | _Feed | _Marker | _Flush | _Reset | _Close | _Remove


class Runner:
    """Owns the scheduler on a worker thread; sessions drive it with non-blocking commands."""

    def __init__(self, scheduler: Scheduler, metrics: ServerMetrics | None = None) -> None:
        self.scheduler = scheduler
        self.metrics = metrics
        self.total_slots = scheduler.batch_size
        self.frame_size = scheduler.frame_size
        self.sample_rate = scheduler.sample_rate
        self.iterations = 0  # worker loop passes (tests check that an idle runner sleeps)
        self._cond = threading.Condition()
        self._commands: deque[_Command] = deque()
        self._stopping = False
        self._executor: concurrent.futures.Executor | None = None
        self._owns_executor = False
        self._worker: concurrent.futures.Future[None] | None = None
        # Worker-owned.
        self._channels: dict[int, Channel] = {}
        self._waiting: deque[tuple[Channel, concurrent.futures.Future[bool], float, float | None]]
        self._waiting = deque()
        self._tick_seconds: float | None = None  # the last tick that stepped, until settled

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, executor: concurrent.futures.Executor | None = None) -> None:
        """Run the worker on ``executor`` (the thread that loaded the engine; see
        ``engine_thread``), or on a new thread of its own."""
        if self._worker is not None:
            raise RuntimeError("the runner is already started")
        self._owns_executor = executor is None
        self._executor = engine_thread() if executor is None else executor
        self._worker = self._executor.submit(self._work)
        self._worker.add_done_callback(_log_worker_exit)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: waiting newcomers are refused, open streams get ``Dropped``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._worker is not None:
            concurrent.futures.wait([self._worker], timeout)
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def used_slots(self) -> int:
        """Slots taken by streams (the scheduler's count; an int read from any thread)."""
        return self.scheduler.used_slots

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done() and not self._stopping

    # -- commands (any thread) -------------------------------------------------------------------

    def channel(
        self,
        max_pending: int = 20_000,
        on_overflow: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Channel:
        """A new channel bound to ``loop`` (default: the running loop)."""
        return Channel(loop or asyncio.get_running_loop(), max_pending, on_overflow)

    async def admit(
        self, channel: Channel, *, timeout: float = 0.0, time_offset: float | None = None
    ) -> bool:
        """Give ``channel`` a slot; wait up to ``timeout`` seconds for one. False if none."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self._submit(_Admit(channel, future, time.monotonic() + timeout, time_offset))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.remove(channel)  # the slot may have been granted in the meantime
            raise

    def feed(self, channel: Channel, pcm: np.ndarray) -> None:
        with self._cond:
            channel.inflight += int(pcm.size)
            self._commands.append(_Feed(channel, pcm))
            self._cond.notify()

    def marker(self, channel: Channel, marker_id: int) -> None:
        self._submit(_Marker(channel, marker_id))

    def flush(self, channel: Channel, flush_id: int) -> None:
        self._submit(_Flush(channel, flush_id))

    def reset(self, channel: Channel) -> None:
        self._submit(_Reset(channel))

    def close(self, channel: Channel) -> None:
        """Finish the stream: its last words, pending markers, then ``Closed``."""
        self._submit(_Close(channel))

    def remove(self, channel: Channel) -> None:
        """Drop the stream at once (client gone); frees its slot or its place in the queue."""
        self._submit(_Remove(channel))

    def _submit(self, command: _Command) -> None:
        with self._cond:
            if self._stopping and isinstance(command, _Admit):
                _resolve(command.future, False)
                return
            self._commands.append(command)
            self._cond.notify()

    # -- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                if not (self._commands or self._stopping or self.scheduler.has_work()):
                    self._cond.wait(self._wait_timeout())
                commands, self._commands = self._commands, deque()
                stopping = self._stopping
                for command in commands:
                    if isinstance(command, _Feed):  # "on its way" -> "queued" (updated below)
                        command.channel.inflight -= int(command.pcm.size)
                        command.channel.buffered += int(command.pcm.size)
            self.iterations += 1
            out: dict[Channel, list[Outbound]] = {}
            try:
                for command in commands:
                    self._apply(command, out)
                self._expire_waiters()
                if self.scheduler.has_work():
                    self._tick(out)
                self._note_backlogs()
                self._deliver(out)
                out = {}
                self._settle()
            except Exception as exc:  # a bug or a model failure: drop every stream, keep serving
                log.exception("engine worker failed")
                self._drop_all(f"the model step failed ({type(exc).__name__}: {exc})", out)
            self._deliver(out)
            if stopping:
                out = {}
                self._drop_all("the server is shutting down", out)
                self._deliver(out)
                return

    def _wait_timeout(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, min(deadline for _, _, deadline, _ in self._waiting) - time.monotonic())

    def _apply(self, command: _Command, out: dict[Channel, list[Outbound]]) -> None:
        sched, ch = self.scheduler, command.channel
        match command:
            case _Admit(future=future, deadline=deadline, time_offset=offset):
                if ch.admitted or ch.done:  # a channel is admitted once
                    _resolve(future, False)
                elif self._try_admit(ch, offset):
                    _resolve(future, True)
                elif deadline > time.monotonic():
                    self._waiting.append((ch, future, deadline, offset))
                else:
                    _resolve(future, False)
                return
            case _Remove():
                for entry in [w for w in self._waiting if w[0] is ch]:
                    self._waiting.remove(entry)
                    _resolve(entry[1], False)
                if ch.admitted and not ch.done:
                    steps = sched.steps(ch.id)
                    sched.remove(ch.id)
                    self._release(ch, steps)
                return
        if not ch.admitted or ch.done:
            return  # a command racing with the end of its stream
        try:
            match command:
                case _Feed(pcm=pcm):
                    sched.feed(ch.id, pcm)
                case _Marker(marker_id=marker_id):
                    sched.marker(ch.id, marker_id)
                case _Flush(flush_id=flush_id):
                    sched.flush(ch.id, flush_id)
                case _Reset():
                    sched.reset(ch.id)
                case _Close():
                    sched.close(ch.id)
        except SchedulerError as exc:
            out.setdefault(ch, []).append(Error(str(exc)))

    def _try_admit(self, ch: Channel, time_offset: float | None) -> bool:
        if not self.scheduler.admit(ch.id, time_offset=time_offset):
            return False
        ch.admitted = True
        self._channels[ch.id] = ch
        if self.metrics is not None:
            self.metrics.open_channels.set(self.scheduler.used_slots)
        return True

    def _release(self, ch: Channel, steps: int) -> None:
        """The stream left the scheduler: forget it and hand its slot to the first waiter."""
        ch.done = True
        self._channels.pop(ch.id, None)
        if self.metrics is not None:
            self.metrics.open_channels.set(self.scheduler.used_slots)
            self.metrics.connection_steps.observe(steps)
        while self._waiting and self.scheduler.free_slots:
            waiter, future, _, offset = self._waiting.popleft()
            _resolve(future, self._try_admit(waiter, offset))

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        for entry in [w for w in self._waiting if w[2] <= now]:
            self._waiting.remove(entry)
            _resolve(entry[1], False)

    def _tick(self, out: dict[Channel, list[Outbound]]) -> None:
        sched = self.scheduler
        before = sched.step_count
        start = time.perf_counter()
        events = sched.tick()
        if sched.step_count != before:
            self._tick_seconds = time.perf_counter() - start
        for sid, evs in events.items():
            ch = self._channels.get(sid)
            if ch is None:  # pragma: no cover - every stream in the scheduler has a channel
                continue
            bucket = out.setdefault(ch, [])
            for ev in evs:
                bucket.append(Ready() if isinstance(ev, Restarted) else ev)
                if isinstance(ev, Closed):
                    self._release(ch, ev.steps)

    def _settle(self) -> None:
        """Finish the step the tick began, then record its durations (the tick and the engine
        call within it, both with the finishing half)."""
        seconds = self.scheduler.settle()
        if self._tick_seconds is None:
            return
        if self.metrics is not None:
            self.metrics.step_duration.observe(self._tick_seconds + seconds)
            self.metrics.engine_step_duration.observe(self.scheduler.last_engine_seconds)
            self.metrics.steps.inc()
        self._tick_seconds = None

    def _note_backlogs(self) -> None:
        """Note each stream's backlog, for ``Channel.wait_for_room``."""
        for ch in self._channels.values():
            ch.buffered = self.scheduler.buffered_samples(ch.id)

    def _drop_all(self, reason: str, out: dict[Channel, list[Outbound]]) -> None:
        for _, future, _, _ in self._waiting:
            _resolve(future, False)
        self._waiting.clear()
        for ch in list(self._channels.values()):
            try:
                steps = self.scheduler.steps(ch.id)
                self.scheduler.remove(ch.id)
            except SchedulerError:  # pragma: no cover - already gone
                steps = 0
            out.setdefault(ch, []).append(Dropped(reason))
            self._release(ch, steps)

    def _deliver(self, out: dict[Channel, list[Outbound]]) -> None:
        for ch, batch in out.items():
            _call_soon(ch, ch.post, batch)
            ch.wants_progress = False
        for ch in self._channels.values():
            if ch.wants_progress:
                ch.wants_progress = False
                _call_soon(ch, ch._wake)


def _call_soon(ch: Channel, fn: Callable[..., None], *args: object) -> None:
    # A closed loop (RuntimeError) means nobody is listening any more.
    with contextlib.suppress(RuntimeError):
        ch.loop.call_soon_threadsafe(fn, *args)


def _resolve(future: concurrent.futures.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _log_worker_exit(worker: concurrent.futures.Future[None]) -> None:
    if not worker.cancelled() and worker.exception() is not None:
        log.error("engine worker stopped", exc_info=worker.exception())
