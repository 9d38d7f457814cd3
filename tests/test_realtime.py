"""The Realtime transcription WebSocket (``/v1/realtime?intent=transcription``) over real sockets:
the ``openai`` package's own realtime client, raw WebSocket clients speaking the documented
events, turn detection on a checkpoint whose VAD heads hear silence, telephony formats, the beta
names, errors and auth. Transcripts are checked against ``dsm-stt transcribe`` of the same audio.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
import websockets
from engine_support import exact_config
from server_support import (
    FRAME,
    SAMPLE_RATE,
    ThreadedServer,
    reference_words,
    threaded_server,
    transcribe_session,
    write_wav,
)
from turn_support import turn_signal, write_turn_checkpoint

from dsm_stt.engine.engine import Engine
from dsm_stt.loading import load_engine
from dsm_stt.model.synthetic import random_lm, random_mimi, tiny_config, write_checkpoint
from dsm_stt.server.config import ServerConfig
from dsm_stt.server.realtime_config import G711_TABLES, PCMA, PCMU
from dsm_stt.server.realtime_items import Timeline

pytestmark = pytest.mark.timeout(120)

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 20.0
# two turns: 3.04 s of speech, a 3.52 s pause, 3.04 s of speech, 2 s of silence
PARTS = [("speech", 3.0), ("silence", 3.5), ("speech", 3.0), ("silence", 2.0)]
SPEECH_ENDS = (38 * FRAME / SAMPLE_RATE, (38 + 44 + 38) * FRAME / SAMPLE_RATE)  # 3.04, 9.6 s
SECOND_START = (38 + 44) * FRAME / SAMPLE_RATE  # 6.56 s
SIGNAL = turn_signal(PARTS, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_turn_checkpoint(tmp_path_factory.mktemp("turns") / "ckpt")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return load_engine(str(checkpoint), exact_config(batch_size=2))


@pytest.fixture(scope="module")
def reference(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """``dsm-stt transcribe`` of ``SIGNAL``: (text, start, end) per word."""
    wav = write_wav(tmp_path_factory.mktemp("wav") / "turns.wav", SIGNAL)
    words = reference_words(checkpoint, [wav], 1)[0]
    assert len(words) >= 10 and any(w[1] > SECOND_START for w in words)  # a real test
    return words


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[ThreadedServer]:
    with threaded_server(ServerConfig(api_keys=(KEY,)), engine) as running:
        yield running


def realtime_url(server: ThreadedServer, query: str = "intent=transcription") -> str:
    return f"ws://127.0.0.1:{server.config.port}/v1/realtime?{query}"


def run(coro: object) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def pcm16(pcm: np.ndarray) -> bytes:
    return np.round(pcm * 32768).clip(-32768, 32767).astype("<i2").tobytes()


def append(data: bytes) -> str:
    event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}
    return json.dumps(event)


async def connect(url: str, headers: dict[str, str] | None = AUTH, **kwargs: Any) -> Any:
    return await asyncio.wait_for(
        websockets.connect(url, additional_headers=headers, max_size=None, proxy=None, **kwargs),
        TIMEOUT,
    )


def _server_events() -> Any:
    """A validator of the ``openai`` package's server event types (None without it)."""
    try:
        import pydantic
        from openai.types.realtime import RealtimeServerEvent
    except ImportError:  # pragma: no cover - the test extra has it
        return None
    return pydantic.TypeAdapter(RealtimeServerEvent)


SERVER_EVENTS = _server_events()


async def recv(ws: Any) -> dict[str, Any]:
    """The next event, checked against the ``openai`` package's types (field names, required
    fields, their types) unless it is one of the beta names the GA types no longer have."""
    event = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    if SERVER_EVENTS is not None and not event["type"].startswith("transcription_session."):
        SERVER_EVENTS.validate_python(event)
    return event


async def recv_until(ws: Any, kind: str, count: int = 1) -> list[dict[str, Any]]:
    """Events up to and including the ``count``-th of type ``kind``."""
    out: list[dict[str, Any]] = []
    while sum(e["type"] == kind for e in out) < count:
        out.append(await recv(ws))
    return out


async def send_chunks(ws: Any, data: bytes, chunk: int, pace: float = 0.0) -> None:
    for i in range(0, len(data), chunk):
        await ws.send(append(data[i : i + chunk]))
        if pace:
            await asyncio.sleep(pace)


def transcript(words: list[tuple]) -> str:
    return " ".join(w[0] for w in words)


def update(turn_detection: object, **audio_input: object) -> str:
    session = {
        "type": "transcription",
        "audio": {"input": {"turn_detection": turn_detection, **audio_input}},
    }
    return json.dumps({"type": "session.update", "session": session})


def check_item_events(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every item's deltas join to its completed transcript, after its committed event, and
    nothing of an item comes after its completion; the completed events, by item id."""
    completed: dict[str, dict[str, Any]] = {}
    deltas: dict[str, list[str]] = {}
    committed: list[str] = []
    for event in events:
        item = event.get("item_id")
        assert item not in completed, f"{event['type']} after the item completed"
        if event["type"].endswith("transcription.delta"):
            assert event["content_index"] == 0
            deltas.setdefault(item, []).append(event["delta"])
        elif event["type"] == "input_audio_buffer.committed":
            assert event["previous_item_id"] == (committed[-1] if committed else None)
            committed.append(item)
        elif event["type"].endswith("transcription.completed"):
            assert item in committed
            assert "".join(deltas.get(item, [])) == event["transcript"]
            assert event["usage"]["type"] == "duration"
            completed[item] = event
    return completed


def item_words(items: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(w["word"], w["start"]) for item in items for w in item["words"]]


def split(reference: list[tuple], items: list[dict[str, Any]], boundary: float) -> list[tuple]:
    """The reference's (word, start) as two items cut at ``boundary`` report them: the
    second item's words start with it at the earliest. (The tiny model sometimes emits pieces
    after a pause without a new WORD token: ``transcribe`` stamps them with the last WORD's
    time, before the pause; they belong to the audio after it.)"""
    n = len(items[0]["words"])
    return [(w[0], w[1] if i < n else max(w[1], boundary)) for i, w in enumerate(reference)]


# --- the openai package's client --------------------------------------------------------------


def test_the_openai_sdk_transcribes_a_file_with_one_commit(
    server: ThreadedServer, reference: list[tuple]
) -> None:
    openai = pytest.importorskip("openai")
    if not hasattr(openai.AsyncOpenAI, "realtime"):  # the GA client (older SDKs: beta only)
        pytest.skip(f"openai {openai.__version__} has no GA realtime client")

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.http}/v1", api_key=KEY)
        connect = client.realtime.connect(extra_query={"intent": "transcription"})
        async with connect as connection:
            created = await connection.recv()
            assert created.type == "session.created"
            assert created.session.type == "transcription"
            input_config = {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": None,
                "noise_reduction": {"type": "near_field"},
            }
            await connection.session.update(
                session={"type": "transcription", "audio": {"input": input_config}}
            )
            updated = await connection.recv()
            assert updated.type == "session.updated"
            echoed = updated.session.audio.input
            assert echoed.turn_detection is None and echoed.format.rate == 24000
            assert echoed.transcription.model == "gpt-4o-transcribe"
            assert echoed.noise_reduction.type == "near_field"
            data = pcm16(SIGNAL)
            for i in range(0, len(data), 4800):  # 100 ms chunks
                await connection.input_audio_buffer.append(
                    audio=base64.b64encode(data[i : i + 4800]).decode()
                )
            await connection.input_audio_buffer.commit()
            events = []
            while True:
                event = await asyncio.wait_for(connection.recv(), TIMEOUT)
                events.append(event)
                if event.type == "conversation.item.input_audio_transcription.completed":
                    return events

    events = run(main())
    kinds = [e.type for e in events]
    assert "input_audio_buffer.speech_started" not in kinds  # turn detection is off
    assert kinds.count("input_audio_buffer.committed") == 1
    completed = events[-1]
    deltas = [e for e in events if e.type.endswith("transcription.delta")]
    assert len(deltas) == len(reference)  # one delta per word, as it is decoded
    assert {e.item_id for e in deltas} == {completed.item_id}
    assert "".join(e.delta for e in deltas) == completed.transcript == transcript(reference)
    assert completed.usage.type == "duration"
    assert completed.usage.seconds == pytest.approx(SIGNAL.size / SAMPLE_RATE, abs=1e-3)
    words = completed.model_extra["words"]  # the extension OpenAI's clients ignore
    assert [(w["word"], w["start"]) for w in words] == [(w[0], w[1]) for w in reference]
    # ends as transcribe has them; one the model never ended ends where the next word starts
    ends = [w[2] if w[2] is not None else nxt[1] for w, nxt in itertools.pairwise(reference)]
    assert [w["end"] for w in words[:-1]] == pytest.approx(ends, abs=1e-3)


# --- turn detection ---------------------------------------------------------------------------


def test_server_vad_commits_each_turn_where_its_speech_stops(
    server: ThreadedServer, reference: list[tuple]
) -> None:
    async def main() -> list[dict[str, Any]]:
        async with await connect(realtime_url(server)) as ws:
            created = await recv(ws)
            default = created["session"]["audio"]["input"]["turn_detection"]
            assert default == {  # OpenAI's default, as the model has VAD heads
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 500,
            }
            turn = {"type": "server_vad", "silence_duration_ms": 700, "create_response": False}
            await ws.send(update(turn))
            updated = await recv(ws)
            assert updated["session"]["audio"]["input"]["turn_detection"] == {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 700,
                "create_response": False,
            }
            # 80 ms messages at 4x real time: each end of turn finds its audio all in
            sender = asyncio.create_task(send_chunks(ws, pcm16(SIGNAL), 2 * FRAME, 0.02))
            events = await recv_until(
                ws, "conversation.item.input_audio_transcription.completed", 2
            )
            await sender
            return events

    events = run(main())
    kinds = [e["type"] for e in events]
    starts = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stops = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
    assert len(starts) == len(stops) == len(committed) == 2
    for start, stop, commit in zip(starts, stops, committed, strict=True):
        assert start["item_id"] == stop["item_id"] == commit["item_id"]
        i = kinds.index
        assert i(start["type"]) <= events.index(start) < events.index(stop)
        assert events.index(commit) == events.index(stop) + 1
    # speech stops where the signal's speech does (the heads lag Mimi by a few frames, then
    # the pause holds for 200 ms: 700 ms = head 0's 500 ms + 200 ms)
    for stop, end in zip(stops, SPEECH_ENDS, strict=True):
        assert end + 0.2 < stop["audio_end_ms"] / 1000 <= end + 0.8
    assert starts[0]["audio_start_ms"] == 0
    # the second turn starts where its speech does, less the 300 ms prefix padding
    assert SECOND_START - 0.5 <= starts[1]["audio_start_ms"] / 1000 <= SECOND_START - 0.2
    completed = check_item_events(events)
    items = [completed[c["item_id"]] for c in committed]
    # the two turns together are the file's transcript, split where the first speech ended
    assert " ".join(item["transcript"] for item in items) == transcript(reference)
    assert all(w["start"] < SPEECH_ENDS[0] for w in items[0]["words"])
    assert any(w["start"] > SECOND_START for w in items[1]["words"])
    # times are the client's (the flush's inserted silence is taken out), and an item's words
    # start within it
    boundary = stops[0]["audio_end_ms"] / 1000
    assert item_words(items) == pytest.approx(split(reference, items, boundary), abs=1e-3)
    assert items[0]["usage"]["seconds"] == pytest.approx(boundary)


def test_semantic_vad_with_a_fast_client_inserts_no_silence(
    server: ThreadedServer, reference: list[tuple]
) -> None:
    async def main() -> list[dict[str, Any]]:
        async with await connect(realtime_url(server)) as ws:
            await recv(ws)
            await ws.send(update({"type": "semantic_vad", "eagerness": "high"}))
            updated = await recv(ws)
            turn = updated["session"]["audio"]["input"]["turn_detection"]
            assert turn == {"type": "semantic_vad", "eagerness": "high"}
            await send_chunks(ws, pcm16(SIGNAL), 4800)  # all at once, 100 ms messages
            return await recv_until(ws, "conversation.item.input_audio_transcription.completed", 2)

    events = run(main())
    completed = check_item_events(events)
    stops = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert len(completed) == len(stops) == 2
    for stop, end in zip(stops, SPEECH_ENDS, strict=True):
        assert end < stop["audio_end_ms"] / 1000 <= end + 0.5
    items = list(completed.values())
    # no flush inserted silence: words and times are exactly those of the file
    assert " ".join(item["transcript"] for item in items) == transcript(reference)
    boundary = stops[0]["audio_end_ms"] / 1000
    assert item_words(items) == split(reference, items, boundary)


# --- formats, beta names, clear ----------------------------------------------------------------


def g711_encode(pcm: np.ndarray, table: np.ndarray) -> bytes:
    """The nearest G.711 byte for each sample (a test encoder over the decoding table)."""
    order = np.argsort(table)
    values = table[order]
    i = np.clip(np.searchsorted(values, pcm), 1, len(values) - 1)
    nearer = np.where(np.abs(values[i - 1] - pcm) < np.abs(values[i] - pcm), i - 1, i)
    return order[nearer].astype(np.uint8).tobytes()


@pytest.mark.parametrize("audio_format", [PCMU, PCMA])
def test_telephony_audio_is_decoded_and_resampled(
    server: ThreadedServer, audio_format: str
) -> None:
    narrow = soxr.resample(SIGNAL[: 5 * SAMPLE_RATE], SAMPLE_RATE, 8000).astype(np.float32)
    data = g711_encode(narrow, G711_TABLES[audio_format])
    # what the server should hear: the decoded bytes, resampled to 24 kHz
    wide = soxr.resample(G711_TABLES[audio_format][np.frombuffer(data, np.uint8)], 8000, 24000)
    expected = run(transcribe_session(server.url, wide.astype(np.float32), {"kyutai-api-key": KEY}))
    assert len(expected) >= 5

    async def main() -> list[dict[str, Any]]:
        async with await connect(realtime_url(server)) as ws:
            await recv(ws)
            await ws.send(update(None, format={"type": audio_format}))
            updated = await recv(ws)
            assert updated["session"]["audio"]["input"]["format"] == {"type": audio_format}
            await send_chunks(ws, data, 160)  # 20 ms packets, as telephony sends them
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            return await recv_until(ws, "conversation.item.input_audio_transcription.completed")

    completed = run(main())[-1]
    assert completed["transcript"] == transcript(expected)
    assert completed["usage"]["seconds"] == pytest.approx(len(data) / 8000, abs=1e-3)


def test_g711_tables_are_the_standard_ones() -> None:
    audioop = pytest.importorskip("audioop")  # in the standard library until Python 3.13
    every = bytes(range(256))
    for audio_format, decode in ((PCMU, audioop.ulaw2lin), (PCMA, audioop.alaw2lin)):
        expected = np.frombuffer(decode(every, 2), dtype="<i2") / 32768
        np.testing.assert_array_equal(G711_TABLES[audio_format], expected)


def test_beta_names_get_beta_answers(server: ThreadedServer, reference: list[tuple]) -> None:
    async def main() -> list[dict[str, Any]]:
        headers = {**AUTH, "OpenAI-Beta": "realtime=v1"}
        async with await connect(realtime_url(server), headers) as ws:
            created = await recv(ws)
            assert created["type"] == "transcription_session.created"
            assert created["session"]["input_audio_format"] == "pcm16"
            session = {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "prompt": ""},
                "turn_detection": None,
            }
            await ws.send(json.dumps({"type": "transcription_session.update", "session": session}))
            updated = await recv(ws)
            assert updated["type"] == "transcription_session.updated"
            assert updated["session"]["object"] == "realtime.transcription_session"
            assert updated["session"]["turn_detection"] is None
            assert updated["session"]["input_audio_transcription"] == {
                "model": "whisper-1",
                "prompt": "",
            }
            await send_chunks(ws, pcm16(SIGNAL[: 4 * SAMPLE_RATE]), 9600)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            return await recv_until(ws, "conversation.item.input_audio_transcription.completed")

    completed = run(main())[-1]
    assert completed["transcript"]  # the first speech's words
    assert transcript(reference).startswith(completed["transcript"])


def test_clear_drops_the_open_item(server: ThreadedServer, reference: list[tuple]) -> None:
    cut = 5 * SAMPLE_RATE  # in the pause between the two turns

    async def main() -> list[dict[str, Any]]:
        async with await connect(realtime_url(server)) as ws:
            await recv(ws)
            await ws.send(update(None))
            await recv(ws)
            await send_chunks(ws, pcm16(SIGNAL[:cut]), 4800)
            await ws.send(json.dumps({"type": "input_audio_buffer.clear", "event_id": "c1"}))
            await send_chunks(ws, pcm16(SIGNAL[cut:]), 4800)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            return await recv_until(ws, "conversation.item.input_audio_transcription.completed")

    events = run(main())
    assert [e["type"] for e in events].count("input_audio_buffer.cleared") == 1
    completed = check_item_events(events)
    (item,) = completed.values()
    later = [w for w in reference if w[1] >= cut / SAMPLE_RATE]
    assert item["transcript"] == transcript(later)
    assert item["usage"]["seconds"] == pytest.approx((SIGNAL.size - cut) / SAMPLE_RATE, abs=1e-3)
    # the cleared item's words were never sent
    assert {e["item_id"] for e in events if "item_id" in e} == {item["item_id"]}


# --- errors and auth --------------------------------------------------------------------------


BAD_EVENTS = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    (json.dumps({"audio": ""}), "missing_required_parameter", "type"),
    (json.dumps({"type": "response.create"}), "invalid_value", "type"),
    (json.dumps({"type": "input_audio_buffer.append"}), "missing_required_parameter", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 5}), "invalid_type", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_value", "audio"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
    (
        update(None, format={"type": "audio/pcm", "rate": 16000}),
        "invalid_value",
        "session.audio.input.format.rate",
    ),
    (
        update({"type": "server_vad", "threshold": 2}),
        "invalid_value",
        "session.audio.input.turn_detection.threshold",
    ),
    (
        update({"type": "server_vad", "silence_duration_ms": "long"}),
        "invalid_type",
        "session.audio.input.turn_detection.silence_duration_ms",
    ),
    (
        update({"type": "semantic_vad", "eagerness": "eager"}),
        "invalid_value",
        "session.audio.input.turn_detection.eagerness",
    ),
    (
        json.dumps({"type": "session.update", "session": {"type": "realtime"}}),
        "invalid_value",
        "session.type",
    ),
    (
        json.dumps(
            {"type": "transcription_session.update", "session": {"input_audio_format": "mp3"}}
        ),
        "invalid_value",
        "session.input_audio_format",
    ),
]


def test_bad_events_get_error_events_and_the_session_goes_on(server: ThreadedServer) -> None:
    async def main() -> None:
        async with await connect(realtime_url(server)) as ws:
            await recv(ws)
            for i, (text, code, param) in enumerate(BAD_EVENTS):
                if text.startswith("{") and not text.startswith("{not"):
                    event = json.loads(text)
                    event["event_id"] = f"evt_{i}"
                    text = json.dumps(event)
                await ws.send(text)
                error = await recv(ws)
                assert error["type"] == "error", text
                assert error["event_id"].startswith("event_")
                body = error["error"]
                assert (body["code"], body["param"]) == (code, param), text
                assert body["type"] == "invalid_request_error" and body["message"]
                expected_id = f"evt_{i}" if "evt" in text else None
                assert body["event_id"] == expected_id
            # the settings were left as they were, and the session still works
            await ws.send(update(None))
            updated = await recv(ws)
            assert updated["session"]["audio"]["input"]["format"] == {
                "type": "audio/pcm",
                "rate": 24000,
            }
            await ws.send(append(pcm16(SIGNAL[:SAMPLE_RATE]) + b"\x01"))  # an odd byte waits
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            events = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
            assert events[-1]["usage"]["seconds"] == pytest.approx(1.0)

    run(main())


def test_keys_intent_and_browser_subprotocols(server: ThreadedServer) -> None:
    async def refused(url: str, headers: dict[str, str] | None) -> tuple[int, dict]:
        with pytest.raises(websockets.InvalidStatus) as caught:
            await connect(url, headers)
        response = caught.value.response
        return response.status_code, json.loads(response.body)

    async def accepted(url: str, headers: dict[str, str] | None, **kwargs: Any) -> Any:
        async with await connect(url, headers, **kwargs) as ws:
            assert (await recv(ws))["type"] == "session.created"
            return ws.subprotocol

    async def main() -> None:
        url = realtime_url(server)
        status, body = await refused(url, None)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert (await refused(url, {"Authorization": "Bearer nope"}))[0] == 401
        status, body = await refused(realtime_url(server, "intent=conversation"), AUTH)
        assert status == 400 and "transcription" in body["error"]["message"]
        await accepted(url, {"kyutai-api-key": KEY})
        await accepted(realtime_url(server, f"intent=transcription&auth_id={KEY}"), None)
        protocols = ["realtime", f"openai-insecure-api-key.{KEY}"]
        assert await accepted(url, None, subprotocols=protocols) == "realtime"
        assert server.used_slots() == 0  # every session gave its slot back

    run(main())


def test_a_model_without_vad_heads_has_no_turn_detection(
    tmp_path: Path, reference: list[tuple]
) -> None:
    cfg = tiny_config(vad=False)
    plain = write_checkpoint(tmp_path / "plain", cfg, random_lm(cfg.lm), random_mimi(cfg.mimi))
    engine = load_engine(str(plain), exact_config(batch_size=1))

    async def main(server: ThreadedServer) -> None:
        async with await connect(realtime_url(server), None) as ws:
            created = await recv(ws)
            assert created["session"]["audio"]["input"]["turn_detection"] is None
            await ws.send(update({"type": "semantic_vad"}))
            error = (await recv(ws))["error"]
            assert error["param"] == "session.audio.input.turn_detection"
            assert "0 VAD head" in error["message"]
            await send_chunks(ws, pcm16(SIGNAL[:SAMPLE_RATE]), 4800)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            events = await recv_until(ws, "conversation.item.input_audio_transcription.completed")
            assert events[-1]["usage"]["seconds"] == pytest.approx(1.0)

    with threaded_server(ServerConfig(), engine) as server:
        run(main(server))


def test_the_timeline_takes_the_flushes_silence_out() -> None:
    timeline = Timeline(24000.0, 1920, delay=6, prefix=0)
    timeline.feed(3000)  # 0.125 s; the flush pads 840 samples to the frame, then 7 frames
    assert timeline.stream_end == pytest.approx(0.125)
    timeline.flush()
    assert timeline.stream_end == pytest.approx(0.125)
    timeline.flush()  # nothing new: no padding
    assert timeline.padding == [(3000, 840 + 7 * 1920)]
    timeline.feed(2400)
    pad = (840 + 7 * 1920) / 24000
    assert timeline.to_client(0.1) == pytest.approx(0.1)
    assert timeline.to_client(0.125 + pad / 2) == pytest.approx(0.125)  # inside the padding
    assert timeline.to_client(0.125 + pad + 0.05) == pytest.approx(0.175)
    assert timeline.client_end == pytest.approx(0.225)
    with_prefix = Timeline(24000.0, 1920, delay=6, prefix=24000)
    with_prefix.feed(2400)
    assert with_prefix.stream_end == pytest.approx(0.1)
    with_prefix.flush()
    assert with_prefix.padding == [(26400, 480 + 7 * 1920)]  # 26400 = 13 frames + 1440
    assert with_prefix.to_client(0.2) == pytest.approx(0.1)


def test_a_full_server_and_a_shutdown_say_why_they_close(engine: Engine) -> None:
    async def main(server: ThreadedServer) -> None:
        url = realtime_url(server)
        first, second = await connect(url), await connect(url)
        for ws in (first, second):
            assert (await recv(ws))["type"] == "session.created"
        async with await connect(url) as third:  # batch of 2: no slot left
            error = await recv(third)
            assert error["error"]["code"] == "no_free_channels"
            assert error["error"]["type"] == "server_error"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await third.recv()
            assert closed.value.rcvd.code == 1013
        await second.close()
        await first.send(update(None))
        await recv(first)
        await send_chunks(first, pcm16(SIGNAL[: 3 * SAMPLE_RATE]), 4800)
        await asyncio.sleep(0.5)
        # SIGTERM: the server drains; the open item is final, then a 1001 close
        assert server.context.loop is not None
        asyncio.run_coroutine_threadsafe(server.context.drain(), server.context.loop)
        events = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                events.append(await recv(first))
        assert closed.value.rcvd.code == 1001 and closed.value.rcvd.reason
        kinds = [e["type"] for e in events]
        assert kinds[-2:] == [
            "input_audio_buffer.committed",
            "conversation.item.input_audio_transcription.completed",
        ]
        assert events[-1]["transcript"]

    with threaded_server(ServerConfig(api_keys=(KEY,)), engine) as server:
        run(main(server))


def test_a_session_without_audio_gets_an_error_then_a_close(engine: Engine) -> None:
    """No ``append`` for ``audio_timeout`` (other events do not count): an ``error`` event
    naming the timeout, then a normal close; audio keeps the session open past it."""

    async def main(server: ThreadedServer) -> None:
        async with await connect(realtime_url(server)) as ws:
            assert (await recv(ws))["type"] == "session.created"
            await asyncio.sleep(0.4)
            await ws.send(update(None))  # not audio
            await send_chunks(ws, pcm16(SIGNAL[:4800]), 4800)  # audio: the clock restarts
            events = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    events.append(await recv(ws))
            assert closed.value.rcvd.code == 1000
            errors = [e for e in events if e["type"] == "error"]
            assert [e["error"]["code"] for e in errors] == ["audio_timeout"]
            assert "no audio received for 0.6 s" in errors[0]["error"]["message"]

    with threaded_server(ServerConfig(audio_timeout=0.6), engine) as server:
        start = time.monotonic()
        run(main(server))
        assert time.monotonic() - start > 0.9  # the audio at 0.4 s moved the deadline to 1.0 s
