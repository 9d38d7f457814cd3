"""End to end against a real ``dsm-stt serve`` process on a loopback port, talking raw msgpack
over ``websockets`` exactly as moshi-server's clients do: the file-client recipe, many
concurrent sessions, auth on the wire, graceful shutdown on SIGTERM, and (slow) a 30-minute
session."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import websockets
from server_support import (
    FRAME,
    SAMPLE_RATE,
    ServerProcess,
    audio_msg,
    connect,
    events,
    pack,
    recv,
    recv_until,
    reference_words,
    running_server,
    send_frames,
    silence,
    speechlike,
    transcribe_session,
    words_of,
    write_talkative_checkpoint,
    write_wav,
)

pytestmark = pytest.mark.timeout(180)

KEY = {"kyutai-api-key": "secret"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_talkative_checkpoint(tmp_path_factory.mktemp("talkative") / "ckpt")


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    log = tmp_path_factory.mktemp("log") / "server.log"
    args = ["--model", str(checkpoint), "--exact", "--batch-size", "16", "--api-key", "secret"]
    with running_server(args, log) as process:
        yield process


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def steps_run(server: ServerProcess) -> float:
    text = server.get("/metrics").text
    return float(re.search(r"^asr_model_steps_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_the_moshi_server_file_client_recipe(
    server: ServerProcess, checkpoint: Path, tmp_path: Path
) -> None:
    """delayed-streams-modeling's ``stt_from_file_rust_server.py``: 1 s of silence, 1920-sample
    chunks, five 1 s silences, Marker, 35 s of silence, read until the Marker."""
    speech = speechlike(3.0, seed=1)
    one_second = silence(1.0)
    before_marker = np.concatenate([one_second, speech, *[one_second] * 5])
    # Words are a causal function of the audio: the offline transcript of what precedes the
    # marker plus its first seconds of trailing silence is what the marker flow must give.
    heard = np.concatenate([before_marker, one_second, one_second])
    (expected,) = reference_words(checkpoint, [write_wav(tmp_path / "heard.wav", heard)], 16)

    async def main() -> list[dict]:
        with pytest.raises(websockets.InvalidStatus) as info:
            await connect(server.url)  # no key
        assert info.value.response.status_code == 401
        async with await connect(server.url, KEY) as ws:

            async def send() -> None:
                await ws.send(audio_msg(one_second))
                await send_frames(ws, speech)
                for _ in range(5):
                    await ws.send(audio_msg(one_second))
                await ws.send(pack({"type": "Marker", "id": 123}))
                for _ in range(35):
                    await ws.send(audio_msg(one_second))

            sender = asyncio.create_task(send())
            msgs = await recv_until(ws, "Marker", timeout=60)
            sender.cancel()
            return msgs

    msgs = run(main())
    assert msgs[0] == {"type": "Ready"}
    assert msgs[-1] == {"type": "Marker", "id": 123}
    got = words_of(events(msgs))
    # Everything before the marker is transcribed: every word that starts in the speech part
    # came back, and the words are exactly the offline transcript's (the last one may still
    # miss its EndWord, which only comes with the next WORD token).
    in_speech = [w for w in expected if w[1] <= 4.0]
    assert len(in_speech) >= 5 and len(got) >= len(in_speech)
    assert [w[:2] for w in got] == [w[:2] for w in expected[: len(got)]]
    assert got[:-1] == expected[: len(got) - 1]
    # Timestamps count from the first sample received (the 1 s of silence included).
    assert got[0][1] >= 0.0 and got[-1][1] < before_marker.size / SAMPLE_RATE
    steps = [m for m in msgs if m["type"] == "Step"]
    assert len(steps) >= before_marker.size // FRAME  # the 1B-style model sends Step messages


def test_sixteen_staggered_sessions_get_the_same_words_as_alone(
    server: ServerProcess, checkpoint: Path, tmp_path: Path
) -> None:
    signals = [np.concatenate([silence(0.5), speechlike(2.0, seed=10 + i)]) for i in range(16)]
    files = [write_wav(tmp_path / f"{i}.wav", pcm) for i, pcm in enumerate(signals)]
    offline = reference_words(checkpoint, files, 16)

    async def alone() -> list:
        return [await transcribe_session(server.url, pcm, KEY) for pcm in signals]

    async def together() -> list:
        sessions = [
            transcribe_session(server.url, pcm, KEY, delay=0.04 * i, pace=0.008)
            for i, pcm in enumerate(signals)
        ]
        return list(await asyncio.gather(*sessions))

    before = steps_run(server)
    solo = run(alone())
    solo_steps = steps_run(server) - before
    batched = run(together())
    batched_steps = steps_run(server) - before - solo_steps
    assert solo == offline
    assert batched == solo
    assert len({tuple(w) for w in solo}) == 16  # sixteen different transcripts
    assert batched_steps < solo_steps / 2  # they really shared the batch
    assert server.used_slots() == 0


def test_sigterm_flushes_the_open_sessions_then_exits(checkpoint: Path, tmp_path: Path) -> None:
    signals = [np.concatenate([silence(0.5), speechlike(2.5, seed)]) for seed in (21, 22)]
    files = [write_wav(tmp_path / f"{i}.wav", pcm) for i, pcm in enumerate(signals)]
    expected = reference_words(checkpoint, files, 4)
    args = ["--model", str(checkpoint), "--exact", "--batch-size", "4"]
    process = ServerProcess(args, tmp_path / "log")
    try:

        async def session(pcm: np.ndarray, ready: asyncio.Event) -> tuple[list, int]:
            async with await connect(process.url) as ws:
                assert (await recv(ws))["type"] == "Ready"
                await send_frames(ws, pcm)  # no trailing silence, no Flush, no Marker
                msgs = []
                while len([m for m in msgs if m["type"] == "Step"]) < pcm.size // FRAME:
                    msgs.append(await recv(ws))
                ready.set()
                with pytest.raises(websockets.ConnectionClosedOK) as info:
                    while True:
                        msgs.append(await recv(ws))
                return words_of(events(msgs)), info.value.rcvd.code  # type: ignore[union-attr]

        async def main() -> list:
            ready = [asyncio.Event(), asyncio.Event()]
            tasks = [
                asyncio.ensure_future(session(p, r)) for p, r in zip(signals, ready, strict=True)
            ]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
            process.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks))

        results = run(main())
        assert [words for words, _ in results] == expected  # the last words came out
        assert [code for _, code in results] == [1001, 1001]  # "going away"
        assert process.proc.wait(30) == 0
    finally:
        process.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_thirty_minute_session_at_accelerated_speed(checkpoint: Path, tmp_path: Path) -> None:
    minute = np.concatenate([speechlike(50.0, seed=5), silence(10.0)])
    args = ["--model", str(checkpoint), "--exact", "--batch-size", "2", "--audio-timeout", "30"]
    with running_server(args, tmp_path / "log") as server:

        async def main() -> dict:
            figures: dict = {}
            async with await connect(server.url) as ws:
                assert (await recv(ws))["type"] == "Ready"
                counts = {"Word": 0, "Step": 0}

                async def read() -> None:
                    while True:
                        msg = await recv(ws, timeout=60)
                        counts[msg["type"]] = counts.get(msg["type"], 0) + 1
                        if msg["type"] == "Flushed":
                            return

                reader = asyncio.create_task(read())
                start = time.monotonic()
                for m in range(30):
                    await send_frames(ws, minute)
                    if m == 1:
                        figures["rss_after_2_min_kib"] = server.rss_kib()
                await ws.send(pack({"type": "Flush", "id": 1}))
                await asyncio.wait_for(reader, 300)
                figures["wall_s"] = time.monotonic() - start
                figures["rss_end_kib"] = server.rss_kib()
                figures |= counts
            return figures

        figures = run(main())
    growth = figures["rss_end_kib"] - figures["rss_after_2_min_kib"]
    print(
        f"\n30 min of audio in {figures['wall_s']:.1f} s "
        f"({1800 / figures['wall_s']:.1f}x real time), {figures['Step']} steps, "
        f"{figures['Word']} words; server RSS {figures['rss_after_2_min_kib'] / 1024:.1f} MiB "
        f"after 2 min of audio, {figures['rss_end_kib'] / 1024:.1f} MiB at the end "
        f"(growth {growth / 1024:+.1f} MiB)"
    )
    assert figures["Step"] >= 30 * minute.size // FRAME
    assert growth < 32 * 1024


def test_sigterm_finishes_a_running_post(checkpoint: Path, tmp_path: Path) -> None:
    """A POST being transcribed when SIGTERM comes gets its whole answer (200, every word
    of the offline transcription), then the server exits 0; a POST after the signal is
    refused (503) or finds the server gone."""
    import threading

    import httpx

    # long enough to outlast uvicorn's own 5 s of graceful shutdown, which used to cancel it
    pcm = np.concatenate([silence(0.5), speechlike(240.0, 31)])
    wav = write_wav(tmp_path / "long.wav", pcm)
    args = ["--model", str(checkpoint), "--exact", "--batch-size", "2"]
    process = ServerProcess(args, tmp_path / "log")
    try:
        answer: dict = {}

        def post() -> None:
            answer["response"] = httpx.post(
                f"{process.http}/api/asr-streaming", content=wav.read_bytes(), timeout=120
            )

        thread = threading.Thread(target=post)
        thread.start()
        deadline = time.monotonic() + 30
        while process.used_slots() == 0:
            assert time.monotonic() < deadline, "the POST never took a slot"
            time.sleep(0.01)
        process.proc.send_signal(signal.SIGTERM)
        thread.join(120)
        response = answer["response"]
        assert response.status_code == 200
        words = [w for w in response.json() if w["type"] == "Word"]
        assert len(words) >= 80  # the whole four minutes, not a cut-off part
        assert process.proc.wait(30) == 0
    finally:
        process.stop()


def test_out_of_file_descriptors_is_one_warning_line_and_the_server_recovers(
    checkpoint: Path, tmp_path: Path
) -> None:
    """With its open-files limit lowered to a few more than it holds, the server cannot accept
    a burst of connections: it logs one warning line naming the remedy (not a traceback a
    second), counts the failures in /metrics, and serves again once the sockets close."""
    import os
    import resource
    import socket

    log = tmp_path / "server.log"
    with running_server(["--model", str(checkpoint), "--exact", "--batch-size", "2"], log) as srv:
        held = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
        _, hard = resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (held + 8, hard))
        sockets = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(40)]
        time.sleep(3.5)  # asyncio retries the accept every second: several failures
        for sock in sockets:
            sock.close()
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (hard, hard))
        deadline = time.monotonic() + 20
        while True:  # the closed sockets are accepted and dropped first
            try:
                if srv.get("/health").status_code == 200:
                    break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        metrics = srv.get("/metrics").text
        failures = float(re.search(r"^asr_accept_failures_total (\S+)", metrics, re.M)[1])
        text = srv.log()
    warnings = [line for line in text.splitlines() if "cannot accept connections" in line]
    assert failures >= 2, text[-2000:]
    assert len(warnings) == 1, warnings
    assert "--max-connections" in warnings[0] and "ulimit -n" in warnings[0]
    assert "Traceback" not in text and "out of system resource" not in text
