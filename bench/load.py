"""Server load benchmark: N real-time WebSocket sessions against ``dsm-stt serve``.

For each N of ``--sessions`` it opens N sessions at once (``dsm_stt.client.SttClient``, so the
``kyutai-api-key`` header and the ``Ready`` handshake are the client's), streams ``--seconds``
of audio in each as 80 ms ``Audio`` messages (1920 float32 samples at 24 kHz) paced by the wall
clock like a microphone, then sends ``Flush`` and reads until ``Flushed``. It reports:

* **Step lag.** The server sends ``Step`` after each model step of a stream, one per 80 ms frame
  and in frame order, so a session's k-th ``Step`` answers its k-th frame (``step_idx`` itself
  is the server's global step counter: it increases but skips the steps other streams ran
  alone). A session's audio starts at ``t0``; frame k holds audio [k, k+1) × 80 ms and, as from
  a microphone, is sent when its last sample exists, at ``t0 + (k+1) × 80 ms`` (never earlier;
  later only if this client falls behind, which is reported as "late"). Its lag is
  ``recv_time(Step k) − (t0 + (k+1) × 80 ms)``. Sessions start staggered over one frame period;
  the first ``--warmup`` seconds of each are left out. N passes when every session got
  ``Ready`` and a ``Step`` for every frame, none got an ``Error`` or was refused, and the p99 lag
  over all sessions is under ``--lag-limit-ms`` (80 ms). The largest passing N is reported.
* **Word latency**, from the end of a word in the audio to its ``Word`` message:
  ``recv_time(Word) − (t0 + stop_time)``, where ``stop_time`` comes from the word's ``EndWord``.
  That is the model's own alignment, not a ground truth: in this protocol (as in moshi-server) a
  word ends where the next word starts, or where the audio stopped at a ``Flush``; after a word
  followed by a pause ``stop_time`` lies past the real end, and the latency is understated (it
  can be negative). "First-word latency" is the same figure for the first word of each session.
  Only words the model sent while streaming count: those the final ``Flush`` forces out (sent
  once the metrics window is closed, a moment after the last frame) are left out. A model with
  random weights may utter no word at all before the Flush ("no words").
* **Server overhead per step**, from ``/metrics`` scraped when the audio starts and when it ends:
  ``asr_model_step_duration`` times the engine worker's whole scheduler tick,
  ``asr_engine_step_duration`` only the engine call inside it; the difference of their means is
  the host work the server adds to each model step on the engine thread (framing the batch,
  per-stream events and words). Work on the event-loop thread (MessagePack, sockets) runs
  beside the engine and shows only as contention: compare the engine time across N for that.
  Steps/s and streams per step (how full the batch was) are reported too.

``--pace P`` sends a frame every P × 80 ms instead (P > 1: slower than real time) and measures
every latency against that clock (frame k exists at ``t0 + (k+1) × P × 80 ms``, a word's end at
``t0 + P × stop_time``): the latency a machine that cannot keep up in real time would give
with a faster CPU, never a real-time result (N passes only at P = 1 in that sense).

The load generator shares the machine with the server when both run on one host: on a small
CPU, its own work (and its lateness, reported) belongs to the figures.

    python bench/load.py --serve "--random-weights --model tiny --batch-size 64" \\
        --sessions 1,16,64 --seconds 10
    python bench/load.py --url ws://127.0.0.1:8080/api/asr-streaming --sessions 1..64 --json

``--sessions`` takes a list (every N is run, in order) or a doubling range ``A..B`` (A, 2A, …,
B; stops after the first N that fails). ``--serve "ARGS"`` starts ``dsm-stt serve ARGS`` on a
free loopback port, waits for ``/health`` and stops it with SIGTERM at the end. Without
``--audio`` each session streams a generated speech-like signal; with it, a file (any format
FFmpeg reads), looped if shorter than ``--seconds``. Sessions start at different places of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import multiprocessing
import multiprocessing.connection
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import websockets

from dsm_stt.client import FRAME_SIZE, SAMPLE_RATE, ServerError, SttClient
from dsm_stt.server.protocol import EndWord, Error, Flushed, Step, Word

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE
FLUSH_ID = 7_424_242
DEFAULT_PATH = "/api/asr-streaming"


# --------------------------------------------------------------------------------------------
# audio


def generated_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A speech-like signal: voiced "syllables" of 100-400 ms with a gliding pitch and a few
    harmonics, pauses between them, a little noise; float32 at 24 kHz."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE)
    out = np.zeros(n, dtype=np.float64)
    pos = 0
    while pos < n:
        length = int(rng.uniform(0.1, 0.4) * SAMPLE_RATE)
        t = np.arange(min(length, n - pos)) / SAMPLE_RATE
        f0 = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        voiced = sum(np.sin(h * phase) / h for h in range(1, 6))
        envelope = np.sin(np.pi * t / max(t[-1], 1e-3)) ** 2 if t.size else t
        out[pos : pos + t.size] = 0.3 * voiced * envelope
        pos += t.size + int(rng.uniform(0.02, 0.25) * SAMPLE_RATE)  # then a short pause
    out += 0.01 * rng.standard_normal(n)
    return out.astype(np.float32)


def audio_frames(path: str | None, seconds: float) -> np.ndarray:
    """The base signal as [frames, 1920] float32 (at least ``seconds`` or 10 s of it)."""
    if path is None:
        pcm = generated_audio(max(seconds, 10.0))
    else:
        from dsm_stt.audio import load_audio

        pcm = load_audio(path)
        if pcm.size < FRAME_SIZE:
            raise SystemExit(f"{path}: shorter than one 80 ms frame")
    pcm = pcm[: pcm.size // FRAME_SIZE * FRAME_SIZE]
    return pcm.reshape(-1, FRAME_SIZE)


# --------------------------------------------------------------------------------------------
# one session


@dataclass
class SessionResult:
    index: int
    ready: bool = False
    error: str | None = None
    flushed: bool = False
    t0: float = 0.0  # loop time where the session's audio starts
    period: float = FRAME_SECONDS  # wall seconds between frames (--pace times 80 ms)
    flush_sent: float = math.inf  # loop time of the Flush after the last frame
    frames_sent: int = 0
    late: list[float] = field(default_factory=list)  # send time - due time, per frame
    step_recv: list[float] = field(default_factory=list)  # receive time of the k-th Step
    step_idx: list[int] = field(default_factory=list)
    # [receive time, start_time, stop_time or None, text], in arrival order
    words: list[list[Any]] = field(default_factory=list)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message

    def lags(self, warmup: float) -> list[float]:
        n = min(len(self.step_recv), self.frames_sent)
        return [
            self.step_recv[k] - (self.t0 + (k + 1) * self.period)
            for k in range(n)
            if (k + 1) * FRAME_SECONDS > warmup
        ]

    def word_latencies(self) -> list[float]:
        """End of each word in the audio -> its Word message, for the words the model sent
        while streaming (with an EndWord): not those the final Flush forced out."""
        pace = self.period / FRAME_SECONDS  # wall seconds per second of audio
        return [
            recv - (self.t0 + stop * pace)
            for recv, _start, stop, text in self.words
            if stop is not None and text.strip() and recv < self.flush_sent
        ]

    def summary(self) -> dict[str, Any]:
        steps = min(len(self.step_recv), self.frames_sent)
        return {
            "ready": self.ready,
            "error": self.error,
            "flushed": self.flushed,
            "frames": self.frames_sent,
            "steps": steps,
            "step_idx_increasing": all(a < b for a, b in itertools.pairwise(self.step_idx)),
            "words": sum(1 for w in self.words if w[3].strip() and w[0] < self.flush_sent),
            "flushed_words": sum(1 for w in self.words if w[3].strip() and w[0] >= self.flush_sent),
        }


async def run_session(
    res: SessionResult,
    client: SttClient,
    frames: np.ndarray,
    first_frame: int,
    n_frames: int,
    end_timeout: float,
    window_closed: asyncio.Event,
) -> None:
    """Stream ``n_frames`` frames starting at ``res.t0``, then (once the metrics window is
    closed, so that the flush's catch-up steps stay out of it) Flush and read until Flushed."""
    loop = asyncio.get_running_loop()

    async def send() -> None:
        for k in range(n_frames):
            due = res.t0 + (k + 1) * res.period
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            res.late.append(loop.time() - due)
            await client.send_audio(frames[(first_frame + k) % len(frames)])
            res.frames_sent += 1
        await window_closed.wait()
        res.flush_sent = loop.time()
        await client.send_flush(FLUSH_ID)

    sender = asyncio.create_task(send())
    deadline = res.t0 + n_frames * res.period + end_timeout
    unended: list[Any] | None = None
    try:
        while True:
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            remaining = deadline - loop.time()
            if remaining <= 0:
                res.fail(f"no Flushed within {end_timeout:g} s after the last frame")
                return
            try:
                msg = await asyncio.wait_for(client.receive(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                continue
            now = loop.time()
            if isinstance(msg, Step):
                res.step_recv.append(now)
                res.step_idx.append(msg.step_idx)
            elif isinstance(msg, Word):
                unended = [now, msg.start_time, None, msg.text]
                res.words.append(unended)
            elif isinstance(msg, EndWord):
                if unended is not None:
                    unended[2] = msg.stop_time
                    unended = None
            elif isinstance(msg, Flushed) and msg.id == FLUSH_ID:
                res.flushed = True
                return
            elif isinstance(msg, Error):
                res.fail(f"Error from the server: {msg.message}")
    except websockets.ConnectionClosed as exc:
        res.fail(f"connection closed ({exc})")
    except Exception as exc:  # a failed send or a bad message: this session's result
        res.fail(f"{type(exc).__name__}: {exc}")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5.0)


# --------------------------------------------------------------------------------------------
# metrics


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            if m:
                with contextlib.suppress(ValueError):
                    out[m.group(1)] = float(m.group(2))
    return out


def http_base(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def scrape(base: str, timeout: float = 10.0) -> dict[str, float] | None:
    """The server's metrics, or None if it has no /metrics (e.g. another server)."""
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as response:
            return parse_metrics(response.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError):
        return None


def server_figures(
    before: dict[str, float] | None,
    after: dict[str, float] | None,
    wall: float,
    frames: int,
) -> dict[str, float | None]:
    """Steps/s, mean tick and engine time, and their difference over a window of ``wall``
    seconds in which ``frames`` frames (all sessions together) were sent."""
    none: dict[str, float | None] = {
        "steps_per_second": None,
        "streams_per_step": None,
        "tick_ms": None,
        "engine_ms": None,
        "overhead_ms": None,
        "overhead_us_per_stream": None,
        "loop_lag_ms": None,
        "loop_lag_max_ms": None,
    }
    if before is None or after is None:
        return none

    def delta(name: str) -> float | None:
        if name not in after:
            return None
        return after[name] - before.get(name, 0.0)

    def mean_ms(histogram: str) -> float | None:
        count, total = delta(f"{histogram}_count"), delta(f"{histogram}_sum")
        if not count or total is None:
            return None
        return 1000.0 * total / count

    out = dict(none)
    steps = delta("asr_model_steps_total")
    if steps is not None and wall > 0:
        out["steps_per_second"] = steps / wall
        if steps > 0:
            out["streams_per_step"] = frames / steps
    out["tick_ms"] = mean_ms("asr_model_step_duration")
    out["engine_ms"] = mean_ms("asr_engine_step_duration")
    out["loop_lag_ms"] = mean_ms("asr_event_loop_lag")
    worst = after.get("asr_event_loop_lag_max_seconds")
    out["loop_lag_max_ms"] = None if worst is None else 1000.0 * worst  # since the server started
    if out["tick_ms"] is not None and out["engine_ms"] is not None:
        out["overhead_ms"] = out["tick_ms"] - out["engine_ms"]
        if out["streams_per_step"]:
            out["overhead_us_per_stream"] = 1000.0 * out["overhead_ms"] / out["streams_per_step"]
    return out


# --------------------------------------------------------------------------------------------
# one N


def stats_ms(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values, dtype=np.float64) * 1000.0
    q = np.percentile(a, [50, 90, 95, 99])
    return {
        "n": int(a.size),
        "min": float(a.min()),
        "mean": float(a.mean()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p95": float(q[2]),
        "p99": float(q[3]),
        "max": float(a.max()),
    }


async def _connect(url: str, api_key: str | None, res: SessionResult) -> SttClient | None:
    try:
        client = await SttClient.connect(url, api_key=api_key, open_timeout=30.0)
    except ServerError as exc:
        res.fail(f"refused: {exc}")
        return None
    except Exception as exc:
        res.fail(f"could not connect: {type(exc).__name__}: {exc}")
        return None
    res.ready = True
    return client


@dataclass(frozen=True)
class Level:
    """What every session of one N streams, in whichever process it runs."""

    url: str
    api_key: str | None
    n: int  # sessions in the level, over every process
    frames: np.ndarray
    n_frames: int  # frames each session sends
    period: float  # wall seconds between a session's frames
    end_timeout: float


async def run_sessions(
    level: Level,
    indices: list[int],
    opened: Callable[[], float],
    closed: Callable[[], object],
) -> list[SessionResult]:
    """Sessions ``indices`` of the level: connect them all, call ``opened`` (blocking, in a
    thread; it returns the monotonic time at which the audio starts), stream, and once
    ``closed`` (blocking, in a thread) returns, Flush. Session i starts i/n of a frame period
    after the start, so sessions of several processes interleave as those of one do."""
    results = [SessionResult(i, period=level.period) for i in indices]
    clients = await asyncio.gather(*(_connect(level.url, level.api_key, r) for r in results))
    start = await asyncio.to_thread(opened)  # loop.time() is time.monotonic()
    window_closed = asyncio.Event()

    async def close_window() -> None:
        try:
            await asyncio.to_thread(closed)
        finally:
            window_closed.set()

    closer = asyncio.create_task(close_window())
    tasks = []
    for res, client in zip(results, clients, strict=True):
        if client is None:
            continue
        res.t0 = start + res.index * level.period / level.n  # staggered over one frame period
        first = (res.index * 37) % len(level.frames)  # sessions do not all say the same thing
        tasks.append(
            run_session(
                res, client, level.frames, first, level.n_frames, level.end_timeout, window_closed
            )
        )
    await asyncio.gather(*tasks)
    window_closed.set()
    await closer
    return results


def _client_process(
    conn: Any, level: Level, indices: list[int], parent_ends: Sequence[Any] = ()
) -> None:
    """One load-generator process of ``--clients``: its sessions, started and closed by the
    parent through ``conn``; sends back their results. ``parent_ends``: the parent's pipe
    ends this fork inherited, closed here, so that the parent's own closing is EOF here."""
    for end in parent_ends:
        end.close()

    def opened() -> float:
        conn.send("connected")
        return conn.recv()

    try:
        conn.send(asyncio.run(run_sessions(level, indices, opened, conn.recv)))
    except BaseException as exc:  # the parent reports it (unless it is gone already)
        with contextlib.suppress(OSError):
            conn.send(f"{type(exc).__name__}: {exc}")


class MetricsWindow:
    """The server's /metrics when the audio starts and when it has ended, and the wall time
    between: ``open`` after every session connected, ``close`` waits for the window's end."""

    def __init__(self, base: str, n_frames: int, period: float, lead: float) -> None:
        self.base, self.n_frames, self.period, self.lead = base, n_frames, period, lead
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.wall = 0.0
        self._start = 0.0

    def open(self) -> float:
        self.before = scrape(self.base)
        self._start = time.monotonic()
        return self._start + self.lead

    def close(self) -> None:
        # when the last session's last frame has been sent and (normally) stepped
        end = self._start + self.lead + (self.n_frames + 2) * self.period
        time.sleep(max(0.0, end - time.monotonic()))
        self.after = scrape(self.base)
        self.wall = time.monotonic() - self._start


def _run_processes(level: Level, clients: int, window: MetricsWindow) -> list[SessionResult]:
    """``run_sessions`` in ``clients`` forked processes, each a share of the N sessions; one
    start time and one metrics window for all. A process that dies or fails is an error
    naming it, never a wait."""
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for part in np.array_split(np.arange(level.n), clients):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_client_process,
            args=(child, level, part.tolist(), [*pipes, parent]),
            daemon=True,
        )
        proc.start()
        child.close()  # the child's end lives in the child: its death is EOF here
        pipes.append(parent)
        procs.append(proc)

    def receive(i: int) -> Any:
        conn, proc = pipes[i], procs[i]
        multiprocessing.connection.wait([conn, proc.sentinel])
        try:
            got = conn.recv() if conn.poll() else None
        except EOFError:
            got = None
        if got is None:
            proc.join(timeout=1)
            raise RuntimeError(f"load-generator process {i} died (exit code {proc.exitcode})")
        if isinstance(got, str) and got != "connected":
            raise RuntimeError(f"load-generator process {i} failed: {got}")
        return got

    try:
        for i in range(clients):
            receive(i)
        start = window.open()
        for conn in pipes:
            conn.send(start)
        window.close()
        for conn in pipes:
            conn.send("closed")
        return [res for i in range(clients) for res in receive(i)]
    finally:
        for conn in pipes:
            conn.close()  # a child still waiting on its pipe gets EOF and ends
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def run_level(
    url: str,
    api_key: str | None,
    n: int,
    frames: np.ndarray,
    seconds: float,
    warmup: float,
    lag_limit_ms: float,
    end_timeout: float,
    pace: float = 1.0,
    clients: int = 1,
) -> dict[str, Any]:
    """N sessions at once, over ``clients`` processes; the per-N result (see the module
    docstring)."""
    period = pace * FRAME_SECONDS
    n_frames = max(1, int(seconds * SAMPLE_RATE) // FRAME_SIZE)
    clients = max(1, min(clients, n))
    window = MetricsWindow(http_base(url), n_frames, period, 0.1 if clients == 1 else 0.3)
    level = Level(url, api_key, n, frames, n_frames, period, end_timeout)
    if clients == 1:
        results = asyncio.run(run_sessions(level, list(range(n)), window.open, window.close))
    else:
        results = _run_processes(level, clients, window)

    # a model without VAD heads sends no Step at all: one clear reason, not one per session
    no_steps = not any(r.step_recv for r in results)
    for res in results:
        if res.ready and res.error is None:
            got = min(len(res.step_recv), res.frames_sent)
            if res.frames_sent < n_frames:
                res.fail(f"sent {res.frames_sent} of {n_frames} frames")
            elif got < res.frames_sent and not no_steps:
                res.fail(f"{res.frames_sent - got} of {res.frames_sent} frames got no Step")

    lags = [lag for r in results for lag in r.lags(warmup)]
    lag = stats_ms(lags)
    late = stats_ms([x for r in results for x in r.late])
    word = stats_ms([x for r in results for x in r.word_latencies()])
    first_word = stats_ms([r.word_latencies()[0] for r in results if r.word_latencies()])
    errors = [f"session {r.index}: {r.error}" for r in results if r.error is not None]
    if no_steps and not errors:
        errors.append(
            "no Step messages: the model has no VAD heads (a -candle checkpoint has them), "
            "so step lag is unknown"
        )
    passed = not errors and lag["n"] > 0 and lag["p99"] < lag_limit_ms
    level: dict[str, Any] = {
        "sessions": n,
        "clients": clients,
        "passed": passed,
        "ok_sessions": sum(1 for r in results if r.ready and r.error is None),
        "frames_per_session": n_frames,
        "errors": errors,
        "lag_ms": lag,
        "client_late_ms": late,
        "word_latency_ms": word,
        "first_word_latency_ms": first_word,
    }
    sent = sum(r.frames_sent for r in results)
    level.update(server_figures(window.before, window.after, window.wall, sent))
    level["session_results"] = [r.summary() for r in results]
    return level


def wait_until_idle(base: str, timeout: float = 10.0) -> None:
    """Until the server reports no open channel (the last level's slots are free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = scrape(base)
        if metrics is None or metrics.get("asr_open_channels", 0.0) == 0.0:
            return
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# a server of our own


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedProcess:
    """``dsm-stt serve ARGS --host 127.0.0.1 --port <free>``, until ``stop``. Its output goes
    to ``log_path`` (a temporary file by default); ``env`` replaces the environment."""

    def __init__(
        self,
        args: list[str],
        startup_timeout: float,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        known, _ = _serve_parser().parse_known_args(args)
        if known.host is not None or known.port is not None:
            raise SystemExit("--serve: leave out --host and --port (a free loopback port is used)")
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        self.url = f"ws://127.0.0.1:{self.port}{known.path}"
        self.api_key = known.api_key[0] if known.api_key else None
        cmd = [sys.executable, "-m", "dsm_stt.cli", "serve", *args]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.command = cmd
        # closed in stop()
        self._log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            if _healthy(self.http):
                return
            if time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(
                    f"the server was not healthy after {startup_timeout:g} s:\n{log}"
                )
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def _healthy(base: str) -> bool:
    """GET /health answers 200 (non-2xx answers raise HTTPError, an OSError)."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=1.0) as response:
            return response.status == 200
    except OSError:
        return False


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--path", default=DEFAULT_PATH)
    p.add_argument("--api-key", action="append")
    p.add_argument("--host")
    p.add_argument("--port")
    return p


# --------------------------------------------------------------------------------------------
# the command


def session_counts(spec: str) -> tuple[list[int], bool]:
    """``1,16,64`` -> ([1, 16, 64], False); ``1..64`` -> ([1, 2, 4, ..., 64], True)."""
    try:
        if ".." in spec:
            low, high = (int(x) for x in spec.split("..", 1))
            if not 1 <= low <= high:
                raise ValueError
            counts = []
            n = low
            while n < high:
                counts.append(n)
                n *= 2
            return [*counts, high], True
        counts = [int(x) for x in spec.split(",") if x.strip()]
        if not counts or min(counts) < 1:
            raise ValueError
        return counts, False
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sessions: expected a list like 1,16,64 or a range like 1..64, got {spec!r}"
        ) from None


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}"


HEADER = (
    f"{'N':>4} {'ok':>4} {'pass':>4} | {'lag p50':>7} {'p95':>6} {'p99':>6} {'max':>6} ms | "
    f"{'late p99':>8} | {'steps/s':>7} {'str/step':>8} {'tick':>6} {'engine':>6} "
    f"{'ovh':>5} ms | {'words':>5} {'wl p50':>6} {'p90':>6} {'p99':>6} ms"
)


def row(level: dict[str, Any]) -> str:
    lag, late, word = level["lag_ms"], level["client_late_ms"], level["word_latency_ms"]
    return (
        f"{level['sessions']:>4} {level['ok_sessions']:>4} "
        f"{'yes' if level['passed'] else 'NO':>4} | "
        f"{_fmt(lag.get('p50')):>7} {_fmt(lag.get('p95')):>6} {_fmt(lag.get('p99')):>6} "
        f"{_fmt(lag.get('max')):>6}    | {_fmt(late.get('p99')):>8} | "
        f"{_fmt(level['steps_per_second']):>7} {_fmt(level['streams_per_step']):>8} "
        f"{_fmt(level['tick_ms'], 2):>6} {_fmt(level['engine_ms'], 2):>6} "
        f"{_fmt(level['overhead_ms'], 2):>5}    | {word['n']:>5} {_fmt(word.get('p50'), 0):>6} "
        f"{_fmt(word.get('p90'), 0):>6} {_fmt(word.get('p99'), 0):>6}"
    )


def _dist(label: str, stats: dict[str, Any]) -> str:
    if not stats.get("n"):
        return f"{label}: no words"
    return (
        f"{label}: n={stats['n']}, p50 {stats['p50']:.0f} ms, p90 {stats['p90']:.0f} ms, "
        f"p99 {stats['p99']:.0f} ms (min {stats['min']:.0f}, max {stats['max']:.0f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="N real-time WebSocket sessions against dsm-stt serve: step lag, word "
        "latency, server overhead per step.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--url", help="a running server, e.g. ws://127.0.0.1:8080/api/asr-streaming"
    )
    target.add_argument(
        "--serve",
        metavar="ARGS",
        help='start "dsm-stt serve ARGS" on a free loopback port for the run, e.g. '
        '--serve "--random-weights --model tiny --batch-size 64"',
    )
    parser.add_argument("--api-key", default=None, help="sent as the kyutai-api-key header")
    parser.add_argument(
        "--sessions",
        type=session_counts,
        default=session_counts("1,2,4,8"),
        help="N values: a list (1,16,64: each is run) or a doubling range (1..64: stops at the "
        "first failing N); default 1,2,4,8",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per session (20)")
    parser.add_argument("--audio", default=None, help="audio file (default: generated signal)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of each session left out of the lag"
    )
    parser.add_argument("--lag-limit-ms", type=float, default=80.0, help="p99 step lag limit")
    parser.add_argument(
        "--pace",
        type=float,
        default=1.0,
        help="wall seconds per second of audio: 1 is real time (default); above 1 sends "
        "slower, to measure latencies where the engine cannot keep up in real time",
    )
    parser.add_argument(
        "--end-timeout",
        type=float,
        default=30.0,
        help="seconds after the last frame to wait for Flushed (30)",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=600.0, help="--serve: seconds to get healthy"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="load-generator processes the sessions are spread over (default 1); more where "
        "one process cannot send hundreds of sessions on time (its lateness is reported)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    counts, is_range = args.sessions
    if not 0.1 <= args.pace <= 10:
        parser.error(f"--pace must be between 0.1 and 10, got {args.pace:g}")
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    if args.seconds <= args.warmup:
        parser.error(f"--seconds must be more than --warmup ({args.warmup:g})")
    log = sys.stderr if args.json else sys.stdout

    frames = audio_frames(args.audio, args.seconds)
    served: ServedProcess | None = None
    url, api_key = args.url, args.api_key
    if args.serve is not None:
        print(f"starting dsm-stt serve {args.serve}", file=log, flush=True)
        try:
            served = ServedProcess(shlex.split(args.serve), args.startup_timeout)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        url = served.url
        api_key = api_key if api_key is not None else served.api_key

    levels: list[dict[str, Any]] = []
    try:
        print(
            f"{url}: {args.seconds:g} s of audio per session, 80 ms frames "
            f"{'in real time' if args.pace == 1 else f'every {80 * args.pace:g} ms'}; "
            f"lag limit p99 < {args.lag_limit_ms:g} ms"
            + (
                f"; sessions spread over {args.clients} client processes"
                if args.clients > 1
                else ""
            ),
            file=log,
            flush=True,
        )
        print(HEADER, file=log, flush=True)
        for n in counts:
            wait_until_idle(http_base(url))
            level = run_level(
                url,
                api_key,
                n,
                frames,
                args.seconds,
                args.warmup,
                args.lag_limit_ms,
                args.end_timeout,
                args.pace,
                args.clients,
            )
            levels.append(level)
            print(row(level), file=log, flush=True)
            for error in level["errors"][:3]:
                print(f"      {error}", file=log, flush=True)
            if is_range and not level["passed"]:
                break
    finally:
        if served is not None:
            served.stop()

    passing = [lv for lv in levels if lv["passed"]]
    best = max(passing, key=lambda lv: lv["sessions"]) if passing else None
    biggest = max(levels, key=lambda lv: lv["sessions"])
    result = {
        "url": url,
        "server_command": served.command[1:] if served is not None else None,
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "frame_seconds": FRAME_SECONDS,
        "pace": args.pace,
        "lag_limit_ms": args.lag_limit_ms,
        "clients": args.clients,
        "audio": args.audio or "generated",
        "runs": levels,
        "largest_passing_sessions": best["sessions"] if best else None,
        "latency_at_sessions": best["sessions"] if best else None,
        "word_latency_ms": best["word_latency_ms"] if best else None,
        "first_word_latency_ms": best["first_word_latency_ms"] if best else None,
        "overhead_at_sessions": biggest["sessions"],
        "overhead_ms_per_step": biggest["overhead_ms"],
        "engine_ms_per_step": biggest["engine_ms"],
        "loop_lag_max_ms": biggest["loop_lag_max_ms"],
        "tick_ms_per_step": biggest["tick_ms"],
    }
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
        return 0
    print()
    if best is None:
        print(f"no N kept the p99 step lag under {args.lag_limit_ms:g} ms")
    else:
        n = best["sessions"]
        print(f"largest N with p99 step lag < {args.lag_limit_ms:g} ms: {n}")
        print(_dist(f"word latency (end of word -> Word) at N={n}", best["word_latency_ms"]))
        print(_dist(f"first-word latency at N={n}", best["first_word_latency_ms"]))
    n = biggest["sessions"]
    if biggest["overhead_ms"] is None:
        print("server overhead: unknown (no asr_engine_step_duration in /metrics)")
    else:
        print(
            f"server overhead per step at N={n}: tick {biggest['tick_ms']:.2f} ms - engine "
            f"{biggest['engine_ms']:.2f} ms = {biggest['overhead_ms']:.2f} ms "
            f"({_fmt(biggest['overhead_us_per_stream'])} µs per stream, "
            f"{_fmt(biggest['streams_per_step'])} streams per step)"
        )
        first = levels[0]
        if first is not biggest and first["engine_ms"] is not None:
            print(
                f"engine step at N={first['sessions']}: {first['engine_ms']:.2f} ms, at N={n}: "
                f"{biggest['engine_ms']:.2f} ms"
            )
    if biggest["loop_lag_max_ms"] is not None:
        print(
            f"event-loop lag: mean {_fmt(biggest['loop_lag_ms'], 2)} ms at N={n}, worst "
            f"{biggest['loop_lag_max_ms']:.1f} ms since the server started"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
