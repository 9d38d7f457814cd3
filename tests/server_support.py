"""Helpers for the server tests: a tiny checkpoint whose words depend on the audio, generated
test signals, a real server process on a loopback port, and reference transcripts.

A random tiny model maps every input to the same Mimi code and repeats one text token, so its
"transcript" would be one endless word whatever the audio. ``write_talkative_checkpoint`` bends
the random weights (Mimi's first codebook taken from real latents, the LM's text head fed mostly
by that codebook's embedding) so that words, WORD/PAD boundaries and timestamps change with the
audio: a session that got the wrong audio, lost frames or mixed slots gets different words.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import threading
import time
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import torch
import uvicorn
import websockets
from engine_support import exact_config

from dsm_stt.engine.events import EndWord, Word
from dsm_stt.loading import load_engine
from dsm_stt.model.synthetic import random_lm, random_mimi, tiny_config, write_checkpoint
from dsm_stt.server.app import create_app, uvicorn_config
from dsm_stt.server.config import ServerConfig

SAMPLE_RATE = 24000
FRAME = 1920


def speechlike(
    seconds: float,
    seed: int,
    *,
    floor: float = 0.2,
    depth: float = 0.8,
    noise: float = 0.1,
    gain: float = 0.5,
) -> np.ndarray:
    """A speech-like test signal: a gliding tone in on/off bursts (``floor`` between bursts,
    ``floor + depth`` in them) plus ``noise`` times Gaussian noise, scaled by ``gain`` and
    quantised to 16 bits, so that a WAV file holds exactly the samples a client sends."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f = 150 + 400 * rng.random()
    x = np.sin(2 * np.pi * (f * t + 80 * np.sin(2 * np.pi * 0.7 * t)))
    x *= floor + depth * (np.sin(2 * np.pi * (0.9 + rng.random()) * t) > 0)
    x = gain * (x + noise * rng.standard_normal(n))
    return np.round(np.clip(x, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.round(pcm * 32768).clip(-32768, 32767).astype("<i2").tobytes())
    return path


def write_talkative_checkpoint(directory: Path) -> Path:
    """A tiny checkpoint (official layout, VAD heads) whose words follow the audio."""
    cfg = tiny_config()
    lm = random_lm(cfg.lm, seed=0)
    mimi = random_mimi(cfg.mimi, seed=1)
    latents: list[torch.Tensor] = []
    proj = mimi.quantizer.rvq_first.input_proj
    hook = proj.register_forward_hook(lambda m, i, o: latents.append(o[..., 0].detach().clone()))
    active = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        for seed in range(100, 104):
            state = mimi.allocate_state(1, torch.device("cpu"))
            x = np.concatenate([silence(1.0), speechlike(6.0, seed)])
            for i in range(0, x.size - FRAME + 1, FRAME):
                mimi.step(torch.from_numpy(x[i : i + FRAME])[None, None], state, active)
    hook.remove()
    pool = torch.cat(latents)
    per_run = len(latents) // 4
    quiet = torch.cat([pool[r * per_run : r * per_run + 12] for r in range(4)])  # the 1 s silences
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        book = mimi.quantizer.rvq_first.vq.layers[0]._codebook.embedding
        book.copy_(_spread(pool, book.shape[0]))
        silent_codes = set(torch.cdist(quiet, book).argmin(dim=1).tolist())
        W = lm.text_linear.weight  # [text_card, dim]
        lm.text_emb.weight.mul_(0.1)
        for layer in lm.transformer.layers:  # keep some context dependence, mostly the input
            layer.self_attn.out_proj.weight.mul_(0.2)
            layer.gating.linear_out.weight.mul_(0.2)
        emb = lm.emb[0].weight  # [card + 1, dim]
        n = emb.shape[0] - 1
        scale = 4 * emb.shape[1] ** 0.5
        for j, code in enumerate(torch.randperm(n, generator=g).tolist()):
            if code in silent_codes:  # silence: no words
                emb[code] = scale * W[3] / W[3].norm()
            elif j < 0.35 * n:  # this code says WORD
                emb[code] = scale * W[0] / W[0].norm()
            elif j < 0.5 * n:  # this one PAD
                emb[code] = scale * W[3] / W[3].norm()
            else:
                emb[code] *= 4
    return write_checkpoint(directory, cfg, lm, mimi)


def _spread(points: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` of ``points`` far apart from each other (farthest-point sampling): codes then do
    not flip on float rounding, which differs between batch sizes."""
    chosen = [0]
    dist = (points - points[0]).norm(dim=1)
    for _ in range(k - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (points - points[i]).norm(dim=1))
    return points[chosen]


# --------------------------------------------------------------------------------------------
# words


class SlowEngine:
    """``engine`` with every step ``delay`` seconds longer: a server that cannot keep up, a
    file that takes a while."""

    def __init__(self, engine: Any, delay: float) -> None:
        self._engine, self._delay = engine, delay

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def begin_step(self, *args: object, **kwargs: object) -> object:
        time.sleep(self._delay)
        return self._engine.begin_step(*args, **kwargs)


def words_of(events: Sequence[object]) -> list[tuple[str, float, float | None]]:
    """Word/EndWord events → (text, start, end) as ``transcribe`` reports them: text stripped,
    empty words (and their EndWord) dropped, times rounded to the millisecond."""
    out: list[list] = []
    skip_end = False
    for ev in events:
        if isinstance(ev, Word):
            text = ev.text.strip()
            skip_end = not text
            if text:
                out.append([text, round(max(ev.start_time, 0.0), 3), None])
        elif isinstance(ev, EndWord):
            if not skip_end and out and out[-1][2] is None:
                out[-1][2] = round(max(ev.stop_time, out[-1][1]), 3)
            skip_end = False
    return [tuple(w) for w in out]  # type: ignore[misc]


def reference_words(
    checkpoint: Path, files: Sequence[Path], batch_size: int
) -> list[list[tuple[str, float, float | None]]]:
    """What ``dsm-stt transcribe`` says about ``files`` (no silence prefix: the files carry
    their own padding, as the streaming clients send it)."""
    from dsm_stt.engine.scheduler import Scheduler
    from dsm_stt.transcriber import transcribe_files

    engine = load_engine(str(checkpoint), exact_config(batch_size=batch_size))
    cfg = engine.model.config
    scheduler = Scheduler(engine, cfg.stt.asr_delay_in_tokens, engine.decode)
    results = {r.index: r for r in transcribe_files(scheduler, files, engine.name, 0.0)}
    out = []
    for i in range(len(files)):
        transcript = results[i].transcript
        assert transcript is not None, results[i].error
        out.append([(w.text, w.start, w.end) for w in transcript.words])
    return out


# --------------------------------------------------------------------------------------------
# a real server process


def _load_bench_script() -> Any:
    """``bench/load.py`` as a module (the load benchmark and its server-process harness)."""
    name = "bench_load"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, LOAD_SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


LOAD_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "load.py"
bench_load = _load_bench_script()
free_port = bench_load.free_port


class ServerProcess(bench_load.ServedProcess):
    """The benchmark's served process with one thread per op pool and no hub access, plus the
    HTTP helpers the tests use."""

    def __init__(self, args: Sequence[str], log_path: Path, startup_timeout: float = 90.0) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        super().__init__(list(args), startup_timeout, env=env, log_path=str(log_path))

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", timeout=10.0, **kwargs)  # type: ignore[arg-type]

    def used_slots(self) -> int:
        return int(self.get("/api/modules_info").json()[0]["used_slots"])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def running_server(args: Sequence[str], log_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(args, log_path)
    try:
        yield server
    finally:
        server.stop()


class ThreadedServer:
    """The app under uvicorn on a loopback port, in a thread of the test process (sharing an
    already loaded engine): real sockets, real WebSocket framing, no process start-up."""

    def __init__(self, config: ServerConfig, engine: object, startup_timeout: float = 30.0) -> None:
        self.config = config.replace(host="127.0.0.1", port=free_port(), log_level="warning")
        self.app = create_app(self.config, engine)  # type: ignore[arg-type]
        self.context = self.app.state.server
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the threaded server did not start")
            time.sleep(0.02)
        self.url = f"ws://127.0.0.1:{self.config.port}{self.config.path}"
        self.http = f"http://127.0.0.1:{self.config.port}"

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", timeout=10.0, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.http}{path}", timeout=60.0, **kwargs)  # type: ignore[arg-type]

    def used_slots(self) -> int:
        return int(self.get("/api/modules_info").json()[0]["used_slots"])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def threaded_server(config: ServerConfig, engine: object) -> Iterator[ThreadedServer]:
    server = ThreadedServer(config, engine)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# a raw client, as moshi-server's clients talk (msgpack maps, float32 pcm)

TIMEOUT = 20.0  # no single wait in these tests is allowed to take longer


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_single_float=True)


def audio_msg(pcm: np.ndarray) -> bytes:
    return pack({"type": "Audio", "pcm": np.asarray(pcm, dtype=np.float32).tolist()})


async def connect(url: str, headers: dict[str, str] | None = None) -> Any:
    return await asyncio.wait_for(
        websockets.connect(
            url, additional_headers=headers, max_size=None, proxy=None, close_timeout=1.0
        ),
        TIMEOUT,
    )


async def recv(ws: Any, timeout: float = TIMEOUT) -> dict:
    return msgpack.unpackb(await asyncio.wait_for(ws.recv(), timeout))


async def recv_until(ws: Any, kind: str, timeout: float = TIMEOUT, **fields: object) -> list[dict]:
    """Messages up to and including the first of type ``kind`` (with ``fields``)."""
    out: list[dict] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await recv(ws, max(0.001, deadline - loop.time()))
        out.append(msg)
        if msg["type"] == kind and all(msg.get(k) == v for k, v in fields.items()):
            return out


async def send_frames(ws: Any, pcm: np.ndarray, frame: int = FRAME, pace: float = 0.0) -> None:
    """``pcm`` in messages of ``frame`` samples, ``pace`` seconds apart (0: at once)."""
    for i in range(0, pcm.size, frame):
        await ws.send(audio_msg(pcm[i : i + frame]))
        if pace:
            await asyncio.sleep(pace)


def events(msgs: Sequence[dict]) -> list[object]:
    """Wire dicts → engine event values (Word/EndWord only, the rest dropped)."""
    out: list[object] = []
    for m in msgs:
        if m["type"] == "Word":
            out.append(Word(m["text"], m["start_time"]))
        elif m["type"] == "EndWord":
            out.append(EndWord(m["stop_time"]))
    return out


async def transcribe_session(
    url: str,
    pcm: np.ndarray,
    headers: dict[str, str] | None = None,
    delay: float = 0.0,
    pace: float = 0.0,
) -> list[tuple[str, float, float | None]]:
    """One session: (wait ``delay``), Ready, audio in 80 ms messages, Flush, words."""
    await asyncio.sleep(delay)
    async with await connect(url, headers) as ws:
        first = await recv(ws)
        assert first["type"] == "Ready", first  # (a refusal says why)
        await send_frames(ws, pcm, pace=pace)
        await ws.send(pack({"type": "Flush", "id": 1}))
        return words_of(events(await recv_until(ws, "Flushed", id=1)))
