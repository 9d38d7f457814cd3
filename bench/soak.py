"""Long runs through a real ``dsm-stt serve``: one session for hours, and many sessions churning.

* ``--hours H``: one WebSocket session streams H hours of speech-like audio as fast as the server
  takes it (the model's pace: TCP flow control), reading as it goes. Reports whether it stayed
  connected, the server's RSS over time, the words received, and whether every word's start
  time is after the previous one's and within the audio sent.
  With ``--realtime`` it sends at the pace of real time instead, so the session lasts H hours
  of wall time (what proxies, keep-alives and timeouts see).
* ``--openai``: the long session on OpenAI's Realtime route (``/v1/realtime``, no turn
  detection) instead: the client commits after each 30 s loop of audio, and every commit must
  come back as one ``completed`` item, its transcript its deltas joined.
* ``--ray``: the same through ``dsm-stt serve --ray --replicas 1`` (Ray Serve's proxy in front
  of one replica); the RSS is then the replica's, as it posts it to ``/api/cluster``.
* ``--churn-minutes M``: for M minutes, ``--sessions`` clients at once connect, stream a random
  one of a few test signals, Flush, and disconnect (some midway, some right after connecting),
  then start again. Every session that finished must report exactly the words of its signal
  alone, ``/api/modules_info`` must come back to 0 used slots, and the RSS is sampled every
  ``RSS_EVERY`` seconds (reported per minute: whether it levels off).

The model is the tests' talkative checkpoint (a tiny random model whose Mimi codebooks are built
from the audio, so its words follow the audio: ``tests/server_support.py``), so a session that
loses audio or words shows it. ``--json`` prints one object.

    python bench/soak.py --hours 3 --churn-minutes 5 --sessions 64
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from server_support import (
    FRAME,
    SAMPLE_RATE,
    ServerProcess,
    audio_msg,
    connect,
    pack,
    reference_words,
    silence,
    speechlike,
    transcribe_session,
    write_talkative_checkpoint,
    write_wav,
)


class RayServed(ServerProcess):
    """``dsm-stt serve --ray``: its RSS is the replicas', from the slot board."""

    def rss_kib(self) -> int:
        replicas = self.get("/api/cluster").json()["replicas"]
        return 1024 * sum(int(r.get("rss_mib") or 0) for r in replicas if not r["lost"])


def _loop_frames() -> list[np.ndarray]:
    """The long session's audio: a 30 s speech-like loop, in 80 ms frames."""
    loop_pcm = np.concatenate([silence(1.0), speechlike(29.0, seed=5)])
    return [loop_pcm[i : i + FRAME] for i in range(0, loop_pcm.size, FRAME)]


async def _pace(start: float, i: int, realtime: bool) -> None:
    """With ``realtime``, sleep until frame ``i`` is due (one 80 ms frame every 80 ms)."""
    if realtime:
        ahead = start + i * FRAME / SAMPLE_RATE - time.monotonic()
        if ahead > 0:
            await asyncio.sleep(ahead)


async def _watched(server: ServerProcess, rss: list[tuple[float, int]], start: float, work) -> None:
    """Await ``work`` while sampling the server's RSS every 30 s (and once more at the end)."""

    async def watch() -> None:
        while True:
            rss.append((time.monotonic() - start, server.rss_kib()))
            await asyncio.sleep(30)

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    finally:
        watcher.cancel()
        rss.append((time.monotonic() - start, server.rss_kib()))


def _summary(state: dict, starts: list[float], start: float, rss: list[tuple[float, int]]) -> dict:
    audio_seconds = state["sent"] * FRAME / SAMPLE_RATE
    return {
        "audio_hours": round(audio_seconds / 3600, 3),
        "wall_minutes": round((time.monotonic() - start) / 60, 1),
        "error": state["error"],
        "words": len(starts),
        "timestamps_monotonic": all(b >= a for a, b in itertools.pairwise(starts)),
        "last_word_s": starts[-1] if starts else None,
        "within_audio": bool(not starts or starts[-1] <= audio_seconds + 1.0),
        "rss_mib_first_last_max": [
            round(rss[0][1] / 1024),
            round(rss[-1][1] / 1024),
            round(max(r for _, r in rss) / 1024),
        ],
    }


async def long_session(
    server: ServerProcess, hours: float, rss: list[tuple[float, int]], realtime: bool = False
) -> dict:
    """One moshi-protocol session of ``hours`` of audio, sent as fast as taken, or
    (``realtime``) one 80 ms frame every 80 ms."""
    frames = _loop_frames()
    total = round(hours * 3600 * SAMPLE_RATE / FRAME)
    starts: list[float] = []
    state = {"sent": 0, "error": None}
    start = time.monotonic()
    async with await connect(server.url) as ws:
        assert (await ws.recv()) is not None  # Ready

        async def send() -> None:
            for i in range(total):
                await _pace(start, i, realtime)
                await ws.send(audio_msg(frames[i % len(frames)]))
                state["sent"] = i + 1
            await ws.send(pack({"type": "Flush", "id": 1}))

        async def receive() -> None:
            import msgpack

            while True:
                msg = msgpack.unpackb(await ws.recv())
                if msg["type"] == "Word" and msg["text"].strip():
                    starts.append(msg["start_time"])
                elif msg["type"] == "Error":
                    state["error"] = msg["message"]
                elif msg["type"] == "Flushed":
                    return

        try:
            await _watched(server, rss, start, asyncio.gather(send(), receive()))
        except Exception as exc:  # a disconnect is the finding
            state["error"] = f"{type(exc).__name__}: {exc}"
    return _summary(state, starts, start, rss)


async def long_openai_session(
    server: ServerProcess, hours: float, rss: list[tuple[float, int]], realtime: bool = False
) -> dict:
    """The same on OpenAI's Realtime route (``/v1/realtime?intent=transcription``, no turn
    detection): the client commits the buffer after each 30 s loop of audio, and every commit
    must come back as one ``completed`` item whose transcript is its deltas joined."""
    import base64

    frames = [
        base64.b64encode(np.round(f * 32768).clip(-32768, 32767).astype("<i2").tobytes()).decode()
        for f in _loop_frames()
    ]
    total = round(hours * 3600 * SAMPLE_RATE / FRAME)
    starts: list[float] = []
    state = {"sent": 0, "error": None, "commits": 0, "completed": 0, "mismatched_items": 0}
    deltas: dict[str, list[str]] = {}
    items = -(-total // len(frames))  # one commit per loop of audio, and one for the rest
    url = server.http.replace("http", "ws", 1) + "/v1/realtime?intent=transcription"
    start = time.monotonic()
    async with websockets.connect(url, proxy=None, max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        session = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
        await ws.send(json.dumps({"type": "session.update", "session": session}))

        async def commit() -> None:
            state["commits"] += 1
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))

        async def send() -> None:
            for i in range(total):
                await _pace(start, i, realtime)
                audio = frames[i % len(frames)]
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                state["sent"] = i + 1
                if (i + 1) % len(frames) == 0:
                    await commit()
            if total % len(frames):
                await commit()

        async def receive() -> None:
            while state["completed"] < items:
                event = json.loads(await ws.recv())
                kind = event["type"]
                if kind == "conversation.item.input_audio_transcription.delta":
                    deltas.setdefault(event["item_id"], []).append(event["delta"])
                elif kind == "conversation.item.input_audio_transcription.completed":
                    state["completed"] += 1
                    joined = "".join(deltas.pop(event["item_id"], []))
                    state["mismatched_items"] += joined != event["transcript"]
                    starts.extend(w["start"] for w in event.get("words", []))
                elif kind == "error":
                    state["error"] = event["error"]["message"]
                    return

        try:
            await _watched(server, rss, start, asyncio.gather(send(), receive()))
        except Exception as exc:  # a disconnect is the finding
            state["error"] = f"{type(exc).__name__}: {exc}"
    return _summary(state, starts, start, rss) | {
        k: state[k] for k in ("commits", "completed", "mismatched_items")
    }


RSS_EVERY = 10.0  # seconds between RSS samples in the churn


async def churn(server: ServerProcess, checkpoint: Path, minutes: float, sessions: int) -> dict:
    """``sessions`` clients connecting, streaming, flushing and leaving for ``minutes``."""
    folder = Path(tempfile.mkdtemp())
    signals = [np.concatenate([silence(0.5), speechlike(3.0, seed)]) for seed in range(4)]
    files = [write_wav(folder / f"{i}.wav", pcm) for i, pcm in enumerate(signals)]
    expected = reference_words(checkpoint, files, sessions)
    rng = random.Random(0)
    counts = {"finished": 0, "mismatch": 0, "abandoned": 0, "errors": 0}
    errors: list[str] = []
    deadline = time.monotonic() + minutes * 60
    rss_start = server.rss_kib()

    async def client(k: int) -> None:
        while time.monotonic() < deadline:
            which = rng.randrange(len(signals))
            fate = rng.random()
            try:
                if fate < 0.15:  # leaves midway
                    async with await connect(server.url) as ws:
                        await ws.recv()
                        pcm = signals[which]
                        for i in range(0, pcm.size // 2, FRAME):
                            await ws.send(audio_msg(pcm[i : i + FRAME]))
                    counts["abandoned"] += 1
                    continue
                words = await transcribe_session(server.url, signals[which])
                counts["finished"] += 1
                if words != expected[which]:
                    counts["mismatch"] += 1
            except Exception as exc:  # reported: a refused or dropped session is a finding
                counts["errors"] += 1
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.2)

    samples: list[tuple[float, int]] = []

    async def sample_rss() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            samples.append((time.monotonic() - start, server.rss_kib()))
            await asyncio.sleep(RSS_EVERY)

    await asyncio.gather(sample_rss(), *(client(k) for k in range(sessions)))
    await asyncio.sleep(2.0)
    per_minute: dict[int, int] = {}
    for t, kib in samples:  # the last sample of each minute
        per_minute[int(t // 60)] = round(kib / 1024)
    used = server.used_slots()
    return counts | {
        "sessions_at_once": sessions,
        "minutes": minutes,
        "used_slots_after": used,
        "error_kinds": sorted(set(errors))[:5],
        "rss_mib_start_end": [round(rss_start / 1024), round(server.rss_kib() / 1024)],
        "rss_mib_by_minute": list(per_minute.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=0.0, help="one session this long")
    parser.add_argument("--churn-minutes", type=float, default=0.0)
    parser.add_argument("--sessions", type=int, default=64, help="churning clients at once")
    parser.add_argument("--realtime", action="store_true", help="--hours at real-time pace")
    parser.add_argument("--ray", action="store_true", help="through serve --ray --replicas 1")
    parser.add_argument(
        "--openai", action="store_true", help="--hours on the OpenAI Realtime route"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    checkpoint = write_talkative_checkpoint(Path(tempfile.mkdtemp()) / "ckpt")
    report: dict = {"through": "ray serve, 1 replica" if args.ray else "dsm-stt serve"}
    serve = ["--model", str(checkpoint), "--exact", "--batch-size", str(max(args.sessions, 2))]
    kind = RayServed if args.ray else ServerProcess
    if args.ray:
        serve += ["--ray", "--replicas", "1"]
    server = kind(serve, Path(tempfile.mkdtemp()) / "server.log")
    try:
        if args.hours > 0:
            rss: list[tuple[float, int]] = []
            session = long_openai_session if args.openai else long_session
            report["long_session"] = asyncio.run(
                session(server, args.hours, rss, realtime=args.realtime)
            )
            if report["long_session"]["error"]:
                report["server_log_tail"] = server.log()[-1500:]
        if args.churn_minutes > 0:
            report["churn"] = asyncio.run(
                churn(server, checkpoint, args.churn_minutes, args.sessions)
            )
    finally:
        server.stop()
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
