"""The server over real sockets (uvicorn in a thread of the test process, a tiny checkpoint whose
words follow the audio): sessions equal ``transcribe``, auth, capacity, malformed input, the
Flush and Init extensions, OggOpus, the HTTP routes and the metrics."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import httpx
import msgpack
import numpy as np
import pytest
import websockets
from engine_support import exact_config
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import (
    FRAME,
    SAMPLE_RATE,
    SlowEngine,
    ThreadedServer,
    audio_msg,
    connect,
    events,
    pack,
    recv,
    recv_until,
    reference_words,
    send_frames,
    silence,
    speechlike,
    threaded_server,
    transcribe_session,
    words_of,
    write_talkative_checkpoint,
    write_wav,
)

import dsm_stt.server.app as app_module
import dsm_stt.server.context as context_module
from dsm_stt import __version__
from dsm_stt.config import EngineConfig
from dsm_stt.cpu.quantize import is_quantized
from dsm_stt.engine.engine import Engine
from dsm_stt.loading import load_engine as load_model_engine
from dsm_stt.server.app import load_engine
from dsm_stt.server.config import ModelFiles, ServerConfig

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_talkative_checkpoint(tmp_path_factory.mktemp("talkative") / "ckpt")


def make_engine(checkpoint: Path, batch_size: int) -> Engine:
    return load_model_engine(str(checkpoint), exact_config(batch_size=batch_size))


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return make_engine(checkpoint, 4)


SPEECH = {seed: np.concatenate([silence(1.0), speechlike(3.0, seed)]) for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def reference(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list]:
    """``dsm-stt transcribe`` of each test signal, by seed."""
    folder = tmp_path_factory.mktemp("wav")
    files = [write_wav(folder / f"{seed}.wav", pcm) for seed, pcm in SPEECH.items()]
    return dict(zip(SPEECH, reference_words(checkpoint, files, 4), strict=True))


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_session_equals_transcribe_and_init_restarts_it(engine: Engine, reference: dict) -> None:
    assert len(reference[1]) >= 5 and len({w[0] for w in reference[1]}) >= 3  # a real test

    async def main(url: str) -> None:
        async with await connect(url) as ws:
            assert await recv(ws) == {"type": "Ready"}
            await send_frames(ws, SPEECH[1])
            await ws.send(pack({"type": "Flush", "id": 7}))
            msgs = await recv_until(ws, "Flushed")
            assert msgs[-1] == {"type": "Flushed", "id": 7}
            assert words_of(events(msgs)) == reference[1]
            steps = [m for m in msgs if m["type"] == "Step"]
            assert len(steps[0]["prs"]) == 4  # the tiny model has 4 VAD heads
            assert [s["step_idx"] for s in steps] == sorted(s["step_idx"] for s in steps)
            # Init: the same stream restarts from scratch without reconnecting.
            await ws.send(pack({"type": "Init"}))
            await recv_until(ws, "Ready")
            await send_frames(ws, SPEECH[2][: 5 * FRAME + 77])  # odd sizes are fine too
            await send_frames(ws, SPEECH[2][5 * FRAME + 77 :], frame=3000)
            await ws.send(pack({"type": "Flush"}))  # id is optional
            msgs = await recv_until(ws, "Flushed")
            assert msgs[-1] == {"type": "Flushed", "id": 0}
            assert words_of(events(msgs)) == reference[2]

    with threaded_server(ServerConfig(), engine) as server:
        run(main(server.url))


def test_a_frame_past_the_websocket_limit_is_closed_with_1009(engine: Engine) -> None:
    config = ServerConfig(max_message_bytes=32 * 1024)  # frames past 64 KiB: refused

    async def main(url: str) -> None:
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            await ws.send(b"\x00" * (100 * 1024))  # fits the socket buffers: sent whole
            with pytest.raises(websockets.ConnectionClosedError) as info:
                await recv(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    with threaded_server(config, engine) as server:
        run(main(server.url))


@pytest.mark.parametrize("compression", [False, True])
def test_per_message_compression_only_where_the_server_allows_it(
    engine: Engine, reference: dict, compression: bool
) -> None:
    """Python's websockets offers permessage-deflate; the server declines it (as moshi-server
    does) unless ``ws_compression``, and a compressed session transcribes the same."""

    async def main(url: str) -> None:
        ws = await connect(url)  # offers permessage-deflate
        try:
            accepted = ws.response.headers.get("Sec-WebSocket-Extensions") or ""
            assert ("permessage-deflate" in accepted) == compression
            assert [type(e).__name__ for e in ws.protocol.extensions] == (
                ["PerMessageDeflate"] if compression else []
            )
            assert (await recv(ws))["type"] == "Ready"
            await send_frames(ws, SPEECH[1])
            await ws.send(pack({"type": "Flush", "id": 1}))
            msgs = await recv_until(ws, "Flushed")
            assert words_of(events(msgs)) == reference[1]
        finally:
            await ws.close()

    with threaded_server(ServerConfig(ws_compression=compression), engine) as server:
        run(main(server.url))


def test_ws_compression_is_a_boolean() -> None:
    with pytest.raises(ValueError, match="ws_compression must be true or false, got 'no'"):
        ServerConfig(ws_compression="no")  # type: ignore[arg-type]


def test_api_keys_header_query_and_401_before_any_slot(engine: Engine) -> None:
    config = ServerConfig(api_keys=("k1", "k2"))

    async def main(url: str, used_slots: object) -> None:
        a = await connect(url, {"kyutai-api-key": "k1"})
        b = await connect(url + "?auth_id=k2")
        assert (await recv(a))["type"] == "Ready"
        assert (await recv(b))["type"] == "Ready"
        assert await asyncio.to_thread(used_slots) == 2
        for target, headers in [
            (url, None),
            (url, {"kyutai-api-key": "nope"}),
            (url + "?auth_id=nope", None),
            (url + "?auth_id=k1", {"kyutai-api-key": "nope"}),  # the header wins
        ]:
            with pytest.raises(websockets.InvalidStatus) as info:
                await connect(target, headers)
            assert info.value.response.status_code == 401
        assert await asyncio.to_thread(used_slots) == 2
        await a.close()
        await b.close()

    with threaded_server(config, engine) as server:
        run(main(server.url, server.used_slots))
        assert 'asr_rejected_total{reason="unauthorized"} 4.0' in server.get("/metrics").text
        assert "asr_connect_total 2.0" in server.get("/metrics").text
        wav = io.BytesIO()
        write_wav_to(wav, SPEECH[1][: SAMPLE_RATE // 2])
        assert server.post(config.path, content=wav.getvalue()).status_code == 401
        # POST takes the header only, as moshi-server
        post_q = server.post(config.path + "?auth_id=k1", content=wav.getvalue())
        assert post_q.status_code == 401
        ok = server.post(config.path, content=wav.getvalue(), headers={"kyutai-api-key": "k2"})
        assert ok.status_code == 200
        assert "asr_connect_total 3.0" in server.get("/metrics").text  # the POST counts too


def write_wav_to(buffer: io.BytesIO, pcm: np.ndarray) -> None:
    import wave

    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.round(pcm * 32768).clip(-32768, 32767).astype("<i2").tobytes())


def test_full_server_says_no_free_channels_and_a_disconnect_frees_the_slot(
    checkpoint: Path, reference: dict
) -> None:
    async def main(url: str, used_slots: object) -> None:
        a = await connect(url)
        assert (await recv(a))["type"] == "Ready"
        b = await connect(url)
        assert await recv(b) == {"type": "Error", "message": "no free channels"}
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(b.recv(), 5)
        # A leaves mid-stream, abruptly (no close handshake), with audio still queued.
        await send_frames(a, SPEECH[1])
        await recv_until(a, "Step")
        a.transport.abort()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while await asyncio.to_thread(used_slots) != 0:
            assert loop.time() - t0 < 1.0, "the slot was not freed"
            await asyncio.sleep(0.01)
        assert await transcribe_session(url, SPEECH[2]) == reference[2]

    with threaded_server(ServerConfig(), make_engine(checkpoint, 1)) as server:
        run(main(server.url, server.used_slots))
        text = server.get("/metrics").text
        assert 'asr_rejected_total{reason="no_free_channels"} 1.0' in text


def test_queue_timeout_lets_a_newcomer_wait_for_a_slot(checkpoint: Path) -> None:
    async def main(url: str) -> None:
        a = await connect(url)
        assert (await recv(a))["type"] == "Ready"
        b = await connect(url)
        waiting = asyncio.ensure_future(recv(b))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # accepted, waiting for the slot
        await a.close()
        assert await asyncio.wait_for(waiting, 2.0) == {"type": "Ready"}
        await b.close()

    config = ServerConfig(queue_timeout=10.0)
    with threaded_server(config, make_engine(checkpoint, 1)) as server:
        run(main(server.url))


BAD_FRAMES: list[tuple[bytes, str]] = [
    (b"\xc1", "not a valid MessagePack message"),
    (msgpack.packb([1, 2]), "must be a map"),
    (msgpack.packb({"pcm": [0.0]}), "'type' is missing"),
    (pack({"type": "Nope"}), "unknown message type 'Nope'"),
    (pack({"type": "Audio", "pcm": "abc"}), "Audio.pcm must be an array of numbers"),
    (pack({"type": "Audio", "pcm": [0.0, "x"]}), "found string"),
    (pack({"type": "Audio", "pcm": [0.0, True]}), "found boolean"),
    (pack({"type": "Audio", "pcm": [0.0, float("nan")]}), "sample 1 is nan"),
    (pack({"type": "Audio", "pcm": [float("-inf")]}), "sample 0 is -inf"),
    (msgpack.packb({"type": "Audio", "pcm": [1e39]}), "finite float32"),
    (pack({"type": "Audio"}), "missing the field 'pcm'"),
    (pack({"type": "Marker", "id": "a"}), "Marker.id must be an integer"),
    (pack({"type": "Marker", "id": 2**63}), "fit in a signed 64-bit integer"),
    (pack({"type": "OggOpus", "data": "text"}), "OggOpus.data must be binary"),
    (pack({"type": "OggOpus", "data": b"garbage" * 10}), "expected an Ogg page"),
    (pack({"type": "Audio", "pcm": [0.0] * (60 * SAMPLE_RATE + 1)}), "more than the limit"),
    (b"\x00" * (9 * 1024 * 1024), "exceeds the limit"),
]


def test_malformed_messages_get_an_error_and_every_session_goes_on(
    engine: Engine, reference: dict
) -> None:
    async def abuse(url: str) -> list:
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            await send_frames(ws, SPEECH[1][: 10 * FRAME])
            for frame, expected in BAD_FRAMES:
                await ws.send(frame)
                msg = (await recv_until(ws, "Error"))[-1]
                assert expected in msg["message"], (expected, msg)
            await ws.send("a text frame is ignored")
            await send_frames(ws, SPEECH[1][10 * FRAME :])
            await ws.send(pack({"type": "Flush", "id": 3}))
            msgs = await recv_until(ws, "Flushed")
            assert not [m for m in msgs if m["type"] == "Error"]
            return words_of(events(msgs))

    async def main(url: str) -> None:
        bad, good = await asyncio.gather(abuse(url), transcribe_session(url, SPEECH[2], delay=0.05))
        assert bad == reference[1]  # the abused session still transcribes its audio
        assert good == reference[2]  # and its neighbour never noticed
        # A frame beyond what the WebSocket layer accepts closes that session (1009) only.
        # Sent uncompressed, 17 MiB outlast the socket buffers: the server may close while
        # the client still writes, which the client sees as a reset (the small-limit test
        # below reads the 1009 every time).
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            with pytest.raises(websockets.ConnectionClosedError) as info:
                await ws.send(b"\x00" * (17 * 1024 * 1024))
                await recv(ws)
            assert info.value.rcvd is None or info.value.rcvd.code == 1009
        assert await transcribe_session(url, SPEECH[3]) == reference[3]

    with threaded_server(ServerConfig(), engine) as server:
        run(main(server.url))


def ogg_opus(pcm: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        for i in range(0, pcm.size, 960):
            chunk = np.ascontiguousarray(pcm[None, i : i + 960], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def test_oggopus_input_gives_the_words_of_the_decoded_file(
    engine: Engine, checkpoint: Path, tmp_path: Path
) -> None:
    data = ogg_opus(SPEECH[3])
    path = tmp_path / "speech.opus"
    path.write_bytes(data)
    (expected,) = reference_words(checkpoint, [path], 4)
    assert len(expected) >= 5

    async def main(url: str) -> None:
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            for i in range(0, len(data), 1000):  # pieces cut anywhere, as a browser sends them
                await ws.send(pack({"type": "OggOpus", "data": data[i : i + 1000]}))
            await ws.send(pack({"type": "Flush", "id": 1}))
            msgs = await recv_until(ws, "Flushed")
            got = words_of(events(msgs))
            assert got == expected
            starts = [m["start_time"] for m in msgs if m["type"] == "Word"]
            assert starts == sorted(starts) and starts[-1] > 2.0

    with threaded_server(ServerConfig(), engine) as server:
        run(main(server.url))


def test_audio_timeout_closes_a_silent_session(engine: Engine) -> None:
    async def main(url: str, used_slots: object) -> None:
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            await ws.send("text frames are not audio")
            msg = await recv(ws, timeout=5)
            assert msg["type"] == "Error" and "no audio received for 0.5 s" in msg["message"]
            with pytest.raises(websockets.ConnectionClosedOK):
                await recv(ws)
        assert await asyncio.to_thread(used_slots) == 0

    with threaded_server(ServerConfig(audio_timeout=0.5), engine) as server:
        run(main(server.url, server.used_slots))


def test_post_transcribes_a_file_like_transcribe(
    engine: Engine, reference: dict, tmp_path: Path
) -> None:
    long_speech = np.concatenate([SPEECH[1]] * 25)  # 100 s: well over moshi-server's 2 MB cap
    wav = write_wav(tmp_path / "long.wav", long_speech).read_bytes()
    assert len(wav) > 4_000_000
    with threaded_server(ServerConfig(max_buffered_seconds=2.0), engine) as server:
        short = server.post("/api/asr-streaming", content=(tmp_path / "long.wav").read_bytes()[:0])
        assert short.status_code == 400 and "empty" in short.json()["error"]
        bad = server.post("/api/asr-streaming", content=b"not audio at all" * 100)
        assert bad.status_code == 400 and bad.json()["error"]
        one = write_wav(tmp_path / "one.wav", SPEECH[1]).read_bytes()
        answer = server.post("/api/asr-streaming", content=one)
        assert answer.status_code == 200
        items = answer.json()
        assert {item["type"] for item in items} == {"Word", "EndWord"}
        assert words_of(events(items)) == reference[1]
        long_items = server.post("/api/asr-streaming", content=wav).json()
        long_words = words_of(events(long_items))
        assert long_words[: len(reference[1]) - 1] == reference[1][:-1]
        assert long_words[-1][1] > 95.0
        assert server.used_slots() == 0


def test_info_routes_health_and_metrics(engine: Engine) -> None:
    with threaded_server(ServerConfig(), engine) as server:
        assert server.get("/health").json() == {"status": "ok", "version": __version__}
        (info,) = server.get("/api/modules_info").json()
        assert info["type"] == "batched_asr" and info["path"] == "/api/asr-streaming"
        assert info["used_slots"] == "0" and info["total_slots"] == "4"
        assert info["lm"] == engine.name and info["audio_tokenizer"].endswith(".safetensors")
        build = server.get("/api/build_info").json()
        assert build["name"] == "dsm-stt" and build["batch_size"] == 4
        assert build["device"] == "cpu" and build["dtype"] == str(engine.dtype).split(".")[1]
        assert build["dtype"] in ("float32", "bfloat16")
        run(transcribe_session(server.url, SPEECH[1][: 20 * FRAME]))
        metrics = server.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        steps = float(re.search(r"^asr_model_steps_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        assert steps >= 20 + engine.delay_tokens
        durations = re.search(r"^asr_model_step_duration_count (\S+)$", text, re.M)
        assert durations is not None and float(durations.group(1)) == steps
        assert re.search(r"^asr_connection_num_steps_count 1\.0$", text, re.M)
        assert re.search(r"^asr_open_channels [01]\.0$", text, re.M)
        assert "asr_connect_total 1.0" in text
        lags = re.search(r"^asr_event_loop_lag_count (\S+)$", text, re.M)
        assert lags is not None and float(lags.group(1)) > 0  # the loop is watched
        worst = re.search(r"^asr_event_loop_lag_max_seconds (\S+)$", text, re.M)
        assert worst is not None and 0 <= float(worst.group(1)) < 1.0


def test_unknown_routes_and_methods() -> None:
    # No model needed: the lifespan never runs for these plain HTTP checks.
    from starlette.testclient import TestClient

    from dsm_stt.server.app import create_app

    app = create_app(ServerConfig())
    client = TestClient(app)
    assert client.get("/nope").status_code == 404
    assert client.put("/api/asr-streaming").status_code == 405


def test_load_engine_from_model_files_keeps_the_first_codebooks(checkpoint: Path) -> None:
    """A TOML model section may use fewer codebooks than the file holds (Unmute runs the 1B
    with 20 of 32): the extra embeddings are ignored, as moshi-server does."""
    full = make_engine(checkpoint, 1).model.config
    n_q = full.lm.n_q - 2
    cfg = full.replace(
        lm=full.lm.__class__(**{**full.lm.__dict__, "n_q": n_q}),
        mimi=full.mimi.__class__(**{**full.mimi.__dict__, "num_codebooks": n_q}),
    )
    files = ModelFiles(
        cfg,
        lm=str(checkpoint / cfg.moshi_name),
        mimi=str(checkpoint / cfg.mimi_name),
        tokenizer=str(checkpoint / cfg.tokenizer_name),
    )
    engine = load_engine(ServerConfig(model_files=files, engine=exact_config(batch_size=2)))
    assert engine.model.lm.cfg.n_q == n_q
    out = engine.step(np.zeros((2, FRAME), np.float32), np.ones(2, bool), np.ones(2, bool))
    assert len(out.tokens) == 2
    with pytest.raises(Exception, match="file not found"):
        load_engine(ServerConfig(model_files=ModelFiles(cfg, "/nonexistent.st", "x", "y")))


def test_load_engine_from_model_files_applies_the_quantization(checkpoint: Path) -> None:
    cfg = make_engine(checkpoint, 1).model.config
    files = ModelFiles(
        cfg,
        lm=str(checkpoint / cfg.moshi_name),
        mimi=str(checkpoint / cfg.mimi_name),
        tokenizer=str(checkpoint / cfg.tokenizer_name),
    )
    ec = EngineConfig(batch_size=1, device="cpu", quantize="int8")
    engine = load_engine(ServerConfig(model_files=files, engine=ec))
    assert engine.quantize == "int8" and is_quantized(engine.lm)


def test_one_thread_loads_warms_up_and_steps_the_engine(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All torch work of a server on one thread: OpenMP keeps a worker team per thread that
    ever ran a kernel, and a second team makes every parallel region of the first slower."""
    seen: dict[str, set[int]] = {"load": set(), "step": set()}

    def load_and_watch(config: ServerConfig) -> Engine:
        seen["load"].add(threading.get_ident())
        engine = load_engine(config)

        def watch(method: Callable[..., object]) -> Callable[..., object]:
            def watched(*args: object, **kwargs: object) -> object:
                seen["step"].add(threading.get_ident())
                return method(*args, **kwargs)

            return watched

        # warm-up steps whole; sessions begin and end steps through the scheduler
        for name in ("step", "begin_step", "end_step"):
            setattr(engine, name, watch(getattr(engine, name)))
        return engine

    monkeypatch.setattr(context_module, "load_engine", load_and_watch)
    config = ServerConfig(model=str(checkpoint), engine=exact_config(batch_size=2), warmup_steps=2)
    with threaded_server(config, None) as server:
        words = run(transcribe_session(server.url, SPEECH[1]))
        assert words  # the session was stepped, not only the warm-up
    assert len(seen["load"]) == 1 and seen["step"] == seen["load"]
    assert threading.get_ident() not in seen["load"]


def test_httpx_is_not_needed_by_the_server() -> None:
    assert httpx  # the tests use it; the server must not import it

    assert "httpx" not in app_module.__dict__


def test_drain_sends_the_last_words_and_refuses_newcomers(engine: Engine, reference: dict) -> None:
    async def main(server: object) -> None:
        ctx = server.context  # type: ignore[attr-defined]
        async with await connect(server.url) as ws:  # type: ignore[attr-defined]
            assert (await recv(ws))["type"] == "Ready"
            await send_frames(ws, SPEECH[1])  # no Flush: the drain must finish the words
            msgs: list[dict] = []
            while sum(m["type"] == "Step" for m in msgs) < SPEECH[1].size // FRAME:
                msgs.append(await recv(ws))  # (audio still unread when the drain starts is lost)
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ctx.drain(), ctx.loop))
            with pytest.raises(websockets.ConnectionClosedOK) as info:
                while True:
                    msgs.append(await recv(ws))
            assert info.value.rcvd.code == 1001  # type: ignore[union-attr]
            assert words_of(events(msgs)) == reference[1]
            await asyncio.wait_for(drained, 10)
        health = await asyncio.to_thread(server.get, "/health")  # type: ignore[attr-defined]
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await connect(server.url)  # type: ignore[attr-defined]
        assert refused.value.response.status_code == 503

    with threaded_server(ServerConfig(), engine) as server:
        run(main(server))


def test_a_peer_that_stops_answering_pings_is_dropped(engine: Engine) -> None:
    """The 20 s "no frame" rule: keep-alive pings that are never answered close the
    connection and free the slot (here with 0.2 s / 0.3 s instead of 10 s / 20 s)."""

    config = ServerConfig(ping_interval=0.2, idle_timeout=0.3)
    with threaded_server(config, engine) as server:
        sock, received = _raw_websocket(server.config.port, config.path)
        assert received.startswith(b"HTTP/1.1 101")
        assert server.used_slots() == 1
        # Never answer: the server pings, waits, and gives up.
        deadline = time.monotonic() + 5
        while server.used_slots() != 0:
            assert time.monotonic() < deadline, "the silent peer kept its slot"
            time.sleep(0.05)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                chunks.append(chunk)
        sock.close()
        assert b"keepalive ping timeout" in b"".join(chunks)


def _raw_websocket(port: int, path: str) -> tuple[object, bytes]:
    """A WebSocket opened by hand on a plain socket (a client that then does what it likes):
    the socket and the server's handshake answer."""
    import base64
    import os
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(4096)
    return sock, received


class FakeSocket:
    """The part of Starlette's WebSocket a session uses, over in-memory queues. ``stall_after``
    sends make every later send hang, like a client that stopped reading (its TCP window full)."""

    def __init__(self, frames: list[bytes], stall_after: int | None = None) -> None:
        self.headers: dict[str, str] = {}
        self.query_params: dict[str, str] = {}
        self.incoming: asyncio.Queue[dict] = asyncio.Queue()
        for frame in frames:
            self.incoming.put_nowait({"type": "websocket.receive", "bytes": frame})
        self.sent: list[dict] = []
        self.unsent: list[dict] = []  # sends that hung (the client does not read)
        self.stall_after = stall_after
        self.closed: int | None = None
        self.got_flushed = asyncio.Event()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        return await self.incoming.get()

    async def send_bytes(self, data: bytes) -> None:
        if self.stall_after is not None and len(self.sent) >= self.stall_after:
            self.unsent.append(msgpack.unpackb(data))
            await asyncio.Event().wait()  # forever
        self.sent.append(msgpack.unpackb(data))
        if self.sent[-1]["type"] == "Flushed":
            self.got_flushed.set()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = code


def test_a_client_that_stops_reading_is_dropped_and_its_neighbour_goes_on(
    engine: Engine, reference: dict
) -> None:
    from dsm_stt.server.app import ServerContext
    from dsm_stt.server.websocket import Session

    def frames(pcm: np.ndarray) -> list[bytes]:
        return [pack({"type": "Audio", "pcm": pcm[i : i + FRAME].tolist()})
                for i in range(0, pcm.size, FRAME)]  # fmt: skip

    async def main() -> None:
        ctx = ServerContext(ServerConfig(max_outbound_messages=30), engine)
        await ctx.start()
        try:
            stalled = FakeSocket(frames(np.concatenate([SPEECH[1]] * 3)), stall_after=5)
            healthy = FakeSocket([*frames(SPEECH[2]), pack({"type": "Flush", "id": 1})])
            slow = asyncio.ensure_future(Session(stalled, ctx).run())  # type: ignore[arg-type]
            fine = asyncio.ensure_future(Session(healthy, ctx).run())  # type: ignore[arg-type]
            await asyncio.wait_for(slow, 20)  # dropped: its handler returned
            assert ctx.metrics.rejected.labels("too_slow")._value.get() == 1
            # It was offered an Error naming the limit (which it did not read), then a close.
            assert stalled.unsent[-1]["type"] == "Error"
            assert "more than 30 messages wait unread" in stalled.unsent[-1]["message"]
            assert stalled.closed == 1011
            await asyncio.wait_for(healthy.got_flushed.wait(), 20)
            assert words_of(events(healthy.sent)) == reference[2]
            healthy.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
            await asyncio.wait_for(fine, 5)
            for _ in range(100):
                if ctx.runner.used_slots == 0:
                    break
                await asyncio.sleep(0.01)
            assert ctx.runner.used_slots == 0
        finally:
            await ctx.stop()

    run(main())


@pytest.mark.parametrize("read_ahead_mb", [512.0, 0.0])
def test_a_fast_sender_that_pings_is_answered_while_the_server_reads_ahead(
    read_ahead_mb: float, engine: Engine, checkpoint: Path, tmp_path: Path
) -> None:
    """Clients built on the websockets library (Kyutai's and Unmute's scripts, ours) ping on
    their own and give up when a pong is late. A client that sends all its audio at once puts
    its ping behind that audio: a server that stops reading at its per-session bound cannot
    answer it. Within the read-ahead budget the server reads on (answering the pings) and
    the session ends with every word; with no budget (the contrast) the client times out."""
    pcm = np.concatenate([silence(1.0), speechlike(8.0, seed=7)])
    (expected,) = reference_words(checkpoint, [write_wav(tmp_path / "ping.wav", pcm)], 4)
    config = ServerConfig(max_buffered_seconds=0.5, read_ahead_mb=read_ahead_mb)
    with threaded_server(config, SlowEngine(engine, 0.02)) as server:

        async def main() -> list:
            ws = await websockets.connect(
                server.url, max_size=None, proxy=None, ping_interval=0.3, ping_timeout=0.6
            )
            async with ws:
                assert (await recv(ws))["type"] == "Ready"
                await send_frames(ws, pcm)
                await ws.send(pack({"type": "Flush", "id": 1}))
                return words_of(events(await recv_until(ws, "Flushed", id=1)))

        if read_ahead_mb:
            assert run(main()) == expected
        else:
            with pytest.raises(websockets.ConnectionClosed):
                run(main())


def test_a_client_sending_faster_than_the_engine_is_never_timed_out(
    engine: Engine, checkpoint: Path, tmp_path: Path
) -> None:
    """Kyutai's file client at ``--rtf 1000``: all its audio at once, far more than a session
    may queue, so the server stops reading the socket and the client's pongs wait unread
    behind its audio. Pings every 0.2 s with 0.3 s to answer, 0.5 s of audio queued at most
    and an engine slowed to 20 ms a step: the 9 s of audio take over 2 s, many keep-alive
    deadlines, and the session runs to the end with every word (moshi-server's rule: a
    client that is sending is alive)."""
    pcm = np.concatenate([silence(1.0), speechlike(8.0, seed=7)])
    (expected,) = reference_words(checkpoint, [write_wav(tmp_path / "fast.wav", pcm)], 4)
    assert len(expected) >= 5
    config = ServerConfig(
        ping_interval=0.2, idle_timeout=0.3, max_buffered_seconds=0.5, read_ahead_mb=0
    )
    with threaded_server(config, SlowEngine(engine, 0.02)) as server:
        start = time.monotonic()
        words = run(transcribe_session(server.url, pcm))
        assert time.monotonic() - start > 4 * (config.ping_interval + config.idle_timeout)
        assert words == expected
        assert server.used_slots() == 0 or _eventually(lambda: server.used_slots() == 0)


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_keys_never_reach_the_request_logs(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """``?auth_id=`` (right or wrong) is masked in uvicorn's WebSocket and HTTP lines."""
    from dsm_stt.server import redaction

    config = ServerConfig(api_keys=("s3cret-key",))
    with threaded_server(config, engine) as server:
        loggers = [logging.getLogger(name) for name in redaction.LOGGERS]
        for logger in loggers:  # uvicorn's loggers do not propagate: listen to them directly
            logger.setLevel(logging.INFO)
            logger.addHandler(caplog.handler)
        try:
            for key in ("s3cret-key", "wr0ng-key"):
                with contextlib.suppress(Exception):
                    run(_open_and_close(f"{server.url}?auth_id={key}&x=1"))
            httpx.get(f"{server.http}/health?auth_id=s3cret-key", timeout=10)
        finally:
            for logger in loggers:
                logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("uvicorn")]
    assert sum("auth_id=***" in line and "x=1" in line for line in lines) >= 2  # masked, kept
    assert any("/health?auth_id=***" in line for line in lines)
    assert not any("s3cret-key" in line or "wr0ng-key" in line for line in lines)


async def _open_and_close(url: str) -> None:
    async with await connect(url) as ws:
        assert (await recv(ws))["type"] == "Ready"


def test_a_marker_flood_gets_an_error_and_a_reader_never_overflows(engine: Engine) -> None:
    """Markers wait for their audio, so a flood of them is answered all in one step: over
    the limit of waiting Markers the session ends with an Error naming it (policy close 1008),
    while a client within the limit gets every echo although they exceed, together, what a
    session may have unsent (here 64 waiting at most, 100 unsent)."""
    config = ServerConfig(max_pending_markers=64, max_outbound_messages=100)

    async def main(url: str, markers: int) -> tuple[list[dict], int | None]:
        async with await connect(url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            for i in range(markers):
                await ws.send(pack({"type": "Marker", "id": i}))
            await send_frames(ws, silence(2.0))  # the D frames after them, as clients do
            msgs, code = [], None
            try:
                while len([m for m in msgs if m["type"] == "Marker"]) < markers:
                    msgs.append(await recv(ws))
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            return msgs, code

    with threaded_server(config, engine) as server:
        within, code = run(main(server.url, 64))
        assert code is None
        assert [m["id"] for m in within if m["type"] == "Marker"] == list(range(64))
        assert not [m for m in within if m["type"] == "Error"]
        flood, code = run(main(server.url, 500))
        errors = [m["message"] for m in flood if m["type"] == "Error"]
        assert errors == ["more than 64 Markers / Flushes waiting for their answer: closing"]
        assert code == 1008
        assert _eventually(lambda: server.used_slots() == 0)


def test_post_bodies_over_the_limit_get_413_and_an_abandoned_post_frees_its_slot(
    engine: Engine, tmp_path: Path
) -> None:
    """``--max-upload-mb``: a 413 naming the limit, from the declared length or while the
    body streams; a POST whose client leaves stops transcribing and frees its slot at once
    (the engine is slowed to 20 ms a step: the 20 s file alone would hold it 5 s)."""
    import socket

    wav = io.BytesIO()
    write_wav_to(wav, speechlike(20.0, seed=3))
    data = wav.getvalue()
    config = ServerConfig(max_upload_mb=0.5)
    with threaded_server(config, SlowEngine(engine, 0.02)) as server:
        big = server.post(config.path, content=data)
        assert big.status_code == 413
        assert big.json()["error"] == (
            "request body over the upload limit of 0.5 MiB (--max-upload-mb)"
        )
        chunks = server.post(config.path, content=iter([data[:400_000], data[400_000:]]))
        assert chunks.status_code == 413  # no length declared: stopped while streaming
        small = data[:400_000]  # 8 s of 24 kHz 16-bit audio, within the limit
        sock = socket.create_connection(("127.0.0.1", server.config.port), timeout=5)
        sock.sendall(
            (
                f"POST {config.path} HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\n"
                f"Content-Length: {len(small)}\r\n\r\n"
            ).encode()
            + small
        )
        assert _eventually(lambda: server.used_slots() == 1), "the POST never took a slot"
        sock.close()  # the client leaves mid-transcription
        start = time.monotonic()
        assert _eventually(lambda: server.used_slots() == 0, timeout=3.0)
        assert time.monotonic() - start < 1.0
        ok = server.post(config.path, content=data[:100_000])  # the server goes on
        assert ok.status_code == 200


def test_connections_past_the_cap_get_503(engine: Engine) -> None:
    """``--max-connections``: sockets that go nowhere count, and a newcomer past the cap gets
    a clean 503 instead of piling up until the open-files limit."""
    import socket

    config = ServerConfig(max_connections=3)
    with threaded_server(config, engine) as server:
        idle = [socket.create_connection(("127.0.0.1", server.config.port)) for _ in range(3)]
        try:
            time.sleep(0.2)
            assert server.get("/health").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        assert _eventually(lambda: server.get("/health").status_code == 200)


def _opus_silence(seconds: float) -> bytes:
    """Ogg/Opus silence at 6 kb/s: about 380 bytes a second of audio, a decompression bomb."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        stream.bit_rate = 6000
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, round(48000 * seconds)), np.float32), format="flt", layout="mono"
        )
        frame.sample_rate, frame.pts = 48000, 0
        for packet in (*stream.encode(frame), *stream.encode(None)):
            out.mux(packet)
    return buf.getvalue()


def test_an_ogg_opus_bomb_is_throttled_like_a_fast_sender(engine: Engine) -> None:
    """30 s of audio in 12 kB of Opus, one message: decoded off the event loop a slice at a
    time, so the session never holds much more than its audio bound (1 s here) plus one
    slice, where it used to queue all 30 s at once; and every frame is still transcribed."""
    bomb = _opus_silence(30.0)
    assert len(bomb) < 20_000
    config = ServerConfig(max_buffered_seconds=1.0, read_ahead_mb=0)
    with threaded_server(config, SlowEngine(engine, 0.005)) as server:

        async def main() -> int:
            async with await connect(server.url) as ws:
                assert (await recv(ws))["type"] == "Ready"
                await ws.send(pack({"type": "OggOpus", "data": bomb}))
                await ws.send(pack({"type": "Flush", "id": 1}))
                msgs = await recv_until(ws, "Flushed", timeout=60, id=1)
                return len([m for m in msgs if m["type"] == "Step"])

        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                for session in list(server.context.sessions):
                    channel = getattr(session, "channel", None)
                    if channel is not None:
                        peak = max(peak, channel.backlog())
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            steps = run(main())
        finally:
            stop.set()
            watcher.join()
    assert steps >= 30 * 12.5  # the whole 30 s was transcribed
    assert 0 < peak < 10 * SAMPLE_RATE  # bound (1 s) + one 2 kB slice (~6 s of silence)


def test_a_ping_flood_that_never_reads_its_pongs_is_closed(engine: Engine) -> None:
    """Pings are answered without flow control, so a client that floods them and never reads
    the pongs would grow the server's memory and hold its slot: past 100 pings a second the
    connection is aborted (1008) and the slot is free at once."""
    import os

    config = ServerConfig()
    with threaded_server(config, engine) as server:
        sock, _ = _raw_websocket(server.config.port, config.path)
        assert _eventually(lambda: server.used_slots() == 1)
        ping = b"\x89\x80" + os.urandom(4)  # FIN + ping, masked, no payload
        with contextlib.suppress(OSError):
            for _ in range(50):
                sock.sendall(ping * 20)  # 1000 pings, none of whose pongs is read
        assert _eventually(lambda: server.used_slots() == 0, timeout=3.0)
        sock.close()
        assert run(transcribe_session(server.url, SPEECH[1][: 10 * FRAME])) is not None


def _closed_by_server(sock: object, within: float) -> bool:
    """Whether the server closes ``sock`` (reads EOF) within ``within`` seconds."""
    sock.settimeout(within)  # type: ignore[attr-defined]
    try:
        while sock.recv(4096):  # type: ignore[attr-defined]
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        return True
    return True


def test_connections_that_go_nowhere_are_closed(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A socket that sends nothing, slowloris' headers a byte at a time, and a POST whose
    body stalls are closed at their deadline (0.5 s here for the head, 0.5 s of silence in a
    body), with no traceback; a stalled POST frees its slot; a normal request still works."""
    import socket

    config = ServerConfig(header_timeout=0.5, body_timeout=0.5)
    with threaded_server(config, engine) as server:
        port = server.config.port
        silent = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        assert _closed_by_server(silent, 3.0)
        assert 0.4 < time.monotonic() - start < 2.0
        slow = socket.create_connection(("127.0.0.1", port))
        start = time.monotonic()
        closed = False
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)  # a byte every 50 ms: each resets nothing
        assert closed or _closed_by_server(slow, 2.0)
        assert time.monotonic() - start < 2.5
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            f"POST {config.path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
            + b"RIFF" * 10
        )
        assert _closed_by_server(stalled, 3.0)
        assert server.used_slots() == 0
        assert server.get("/health").status_code == 200  # kept-alive clients are unaffected

        async def long_session() -> list[dict]:  # a WebSocket outlives both deadlines
            async with await connect(server.url) as ws:
                assert (await recv(ws))["type"] == "Ready"
                await send_frames(ws, SPEECH[1][: 20 * FRAME], pace=0.08)  # 1.6 s
                await ws.send(pack({"type": "Flush", "id": 3}))
                return await recv_until(ws, "Flushed", id=3)

        assert run(long_session())[-1] == {"type": "Flushed", "id": 3}
    assert "Exception in ASGI application" not in caplog.text


def test_only_allowed_browser_origins_open_websockets(engine: Engine) -> None:
    """``--allowed-origin``: a browser page of another origin gets 403 before the upgrade
    (no slot taken); allowed origins and clients without an Origin header connect."""
    config = ServerConfig(allowed_origins=("https://app.example",))

    async def main(url: str) -> None:
        with pytest.raises(websockets.InvalidStatus) as denied:
            await connect(url, {"Origin": "https://evil.example"})
        assert denied.value.response.status_code == 403
        for headers in ({"Origin": "https://app.example"}, None):
            async with await connect(url, headers) as ws:
                assert (await recv(ws))["type"] == "Ready"

    with threaded_server(config, engine) as server:
        run(main(server.url))
        assert _eventually(lambda: server.used_slots() == 0)


_FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=64),
    st.lists(st.floats(width=32, allow_nan=True), max_size=50),
)
_FUZZ_FRAMES = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda kind, fields: msgpack.packb({"type": kind, **fields}),
        st.sampled_from(["Audio", "OggOpus", "Marker", "Flush", "Init", "Nope", 7, ""]),
        st.dictionaries(st.sampled_from(["pcm", "data", "id", "extra"]), _FIELD_VALUES, max_size=3),
    ),
)


@settings(max_examples=15, deadline=None)
@given(frames=st.lists(_FUZZ_FRAMES, max_size=25))
def test_a_live_session_survives_any_sequence_of_frames(
    live_server: ThreadedServer, frames: list[bytes]
) -> None:
    """Fuzzed frames on a real socket (random bytes, and MessagePack maps of any type with
    fields of any kind): each bad one gets an Error and the session goes on, so a valid Audio
    and Flush afterwards still get their Flushed, and the server stays healthy."""

    async def main() -> list[dict]:
        async with await connect(live_server.url) as ws:
            assert (await recv(ws))["type"] == "Ready"
            for frame in frames:
                await ws.send(frame)
            await ws.send(audio_msg(silence(0.2)))
            await ws.send(pack({"type": "Flush", "id": 424242}))
            return await recv_until(ws, "Flushed", id=424242)

    msgs = run(main())
    assert all(isinstance(m.get("type"), str) for m in msgs)
    assert live_server.get("/health").status_code == 200


@pytest.fixture(scope="module")
def live_server(engine: Engine) -> Iterator[ThreadedServer]:
    with threaded_server(ServerConfig(), engine) as server:
        yield server


@pytest.mark.parametrize("reads", [False, True])
def test_a_finished_connection_whose_client_does_not_read_is_aborted(
    reads: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing a transport waits for its buffered bytes to leave, which never happens when the
    client stopped reading: once the session is over, a connection whose buffer is still full
    ``ABORT_AFTER`` later is aborted; one that drains is left to close normally."""
    from dsm_stt.server import liveness

    cls = liveness.protocol_class()
    assert isinstance(cls, type) and cls.__name__ == "LivenessProtocol"

    class Transport:
        aborted = False

        def get_write_buffer_size(self) -> int:
            return 0 if reads else 65_536

        def abort(self) -> None:
            self.aborted = True

    async def session_over(self: object) -> None:  # uvicorn's run_asgi: the app returned
        return None

    monkeypatch.setattr(liveness, "ABORT_AFTER", 0.05)
    monkeypatch.setattr(cls.__mro__[1], "run_asgi", session_over)

    async def main() -> Transport:
        proto = object.__new__(cls)
        proto.loop = asyncio.get_running_loop()
        proto.transport = Transport()
        proto.writable = asyncio.Event()  # writing paused: the buffer is over its high mark
        if reads:
            proto.writable.set()
        await proto.run_asgi()
        await asyncio.sleep(0.2)
        return proto.transport

    assert run(main()).aborted is not reads
