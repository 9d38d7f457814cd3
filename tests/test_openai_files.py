"""``POST /v1/audio/transcriptions`` and ``GET /v1/models`` driven by the official ``openai``
package against a server started here on the tiny talkative model: every response format and
the event stream say exactly what ``dsm-stt transcribe`` says of the same file; bad requests
get the documented status and OpenAI's error shape; files leave slots to live sessions, a
client that leaves frees its slot, and a shutdown lets a running file finish."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from engine_support import exact_config
from server_support import (
    SlowEngine,
    connect,
    recv,
    reference_words,
    silence,
    speechlike,
    threaded_server,
    write_talkative_checkpoint,
    write_wav,
)

from dsm_stt.engine.engine import Engine
from dsm_stt.loading import load_engine
from dsm_stt.server.config import ServerConfig
from dsm_stt.server.openai_shapes import IGNORED_HEADER, OPENAI_MODELS, ModelNames

pytestmark = pytest.mark.timeout(120)

KEY = "sekret"
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_talkative_checkpoint(tmp_path_factory.mktemp("talkative") / "ckpt")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return load_engine(str(checkpoint), exact_config(batch_size=4))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("wav")
    speech = np.concatenate([silence(1.0), speechlike(4.0, seed=1)])
    # speech, 3 s of silence, speech: two segments
    paused = np.concatenate([silence(0.5), speechlike(2.5, 2), silence(3.0), speechlike(2.5, 3)])
    return {
        "speech": write_wav(folder / "speech.wav", speech),
        "paused": write_wav(folder / "paused.wav", paused),
    }


@pytest.fixture(scope="module")
def reference(checkpoint: Path, files: dict[str, Path]) -> dict[str, list]:
    """``dsm-stt transcribe`` of each file: (text, start, end) per word."""
    words = reference_words(checkpoint, list(files.values()), 4)
    return dict(zip(files, words, strict=True))


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Any]:
    with threaded_server(ServerConfig(api_keys=(KEY,), max_upload_mb=1.0), engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    # the two-line switch: the base URL and the key
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key=KEY, max_retries=0, timeout=60)


def text_of(words: list) -> str:
    return " ".join(w[0] for w in words)


def transcribe(client: openai.OpenAI, path: Path, **options: Any) -> Any:
    with path.open("rb") as f:
        return client.audio.transcriptions.create(file=f, model="whisper-1", **options)


# --------------------------------------------------------------------------------------------
# the formats


def test_json_and_text_say_what_transcribe_says(
    client: openai.OpenAI, files: dict[str, Path], reference: dict, engine: Engine
) -> None:
    words = reference["speech"]
    assert len(words) >= 5 and len({w[0] for w in words}) >= 3  # a real test
    result = transcribe(client, files["speech"])
    assert isinstance(result, openai.types.audio.Transcription)
    assert result.text == text_of(words)
    assert result.usage is not None and result.usage.type == "duration"
    assert result.usage.seconds == pytest.approx(5.0)
    # the checkpoint's own name (a directory: its last part) and OpenAI's names all work
    for model in ("ckpt", str(engine.name), "gpt-4o-transcribe"):
        with files["speech"].open("rb") as f:
            same = client.audio.transcriptions.create(file=f, model=model)
        assert same.text == result.text
    text = transcribe(client, files["speech"], response_format="text")
    assert isinstance(text, str) and text == result.text + "\n"


CUE = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def parse_cues(document: str, vtt: bool) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue of an SRT or WebVTT document; checks the numbering."""
    if vtt:
        assert document.startswith("WEBVTT\n\n")
        document = document.removeprefix("WEBVTT\n\n")
    cues = []
    for number, block in enumerate(document.strip().split("\n\n"), start=1):
        lines = block.split("\n")
        if not vtt:
            assert lines.pop(0) == str(number)
        stamp = CUE.fullmatch(lines[0])
        assert stamp is not None, lines[0]
        assert ("." if vtt else ",") in lines[0]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, stamp.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        cues.append((start, end, " ".join(lines[1:])))
    return cues


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse_and_hold_the_words(
    fmt: str, client: openai.OpenAI, files: dict[str, Path], reference: dict
) -> None:
    for name in ("speech", "paused"):
        document = transcribe(client, files[name], response_format=fmt)
        assert isinstance(document, str)
        cues = parse_cues(document, vtt=fmt == "vtt")
        words = reference[name]
        assert " ".join(text for _, _, text in cues) == text_of(words)
        assert cues[0][0] == words[0][1]
        for (start, end, _), (after, _, _) in zip(cues, [*cues[1:], (1e9, 0, "")], strict=True):
            assert start <= end <= after


def test_verbose_json_has_words_segments_and_usage(
    client: openai.OpenAI, files: dict[str, Path], reference: dict
) -> None:
    words = reference["paused"]
    result = transcribe(
        client,
        files["paused"],
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert isinstance(result, openai.types.audio.TranscriptionVerbose)
    assert result.text == text_of(words)
    assert result.duration == pytest.approx(8.5) and result.language == "unknown"
    assert result.usage is not None and result.usage.seconds == pytest.approx(8.5)
    assert result.words is not None and len(result.words) == len(words)
    for got, (text, start, end) in zip(result.words, words, strict=True):
        assert (got.word, got.start) == (text, start)
        assert got.end == end if end is not None else got.end >= got.start
    segments = result.segments
    assert segments is not None and [s.id for s in segments] == list(range(len(segments)))
    # cut in the 3 s of silence (3.0-6.0 s), nowhere else: no other pause is that long
    assert len(segments) == 2
    assert segments[0].end <= 4.0 and segments[1].start >= 5.5
    assert " ".join(s.text for s in segments) == result.text
    assert segments[0].start == words[0][1] and segments[1].start in {w[1] for w in words}
    for seg in segments:
        assert seg.start <= seg.end
        assert isinstance(seg.seek, int) and seg.tokens == [] and seg.temperature == 0.0
        assert seg.avg_logprob == 0.0 and seg.no_speech_prob == 0.0
        assert 0 < seg.compression_ratio < 10
    only_segments = transcribe(client, files["paused"], response_format="verbose_json")
    assert only_segments.words is None and only_segments.segments == segments
    only_words = transcribe(
        client, files["paused"], response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert only_words.segments is None and only_words.words == result.words


class SilenceVad:
    """``engine`` whose VAD heads foresee a long pause on every frame of digital silence and
    a word on every other: a checkpoint whose heads fire where the test wants."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        return getattr(self._engine, name)

    def begin_step(self, pcm: np.ndarray, active: np.ndarray, reset: np.ndarray) -> object:
        out = self._engine.begin_step(pcm, active, reset)
        silent = ~np.any(np.asarray(pcm), axis=1)  # [B]
        return dataclasses.replace(out, prs=[(1.0,) * 4 if s else (0.0,) * 4 for s in silent])


def test_segments_are_cut_at_the_vads_ends_of_turn(
    engine: Engine, client: openai.OpenAI, tmp_path: Path, checkpoint: Path
) -> None:
    """0.64 s of silence between two bursts of speech: too short a pause to cut a segment,
    but where the VAD heads say the turn ended (the end of the first silent frame), the
    segment ends."""
    pcm = np.concatenate([silence(0.5), speechlike(2.5, 4), silence(0.64), speechlike(2.5, 5)])
    wav = write_wav(tmp_path / "turns.wav", pcm)
    (words,) = reference_words(checkpoint, [wav], 4)
    plain = transcribe(client, wav, response_format="verbose_json")
    assert len(plain.segments) == 1  # no pause of a second: one segment without turns
    turn_end = (math.ceil(3.0 / 0.08) + 1) * 0.08  # speech stops at 3.0 s
    first, second = [w for w in words if w[1] < turn_end], [w for w in words if w[1] >= turn_end]
    assert first and second
    with threaded_server(ServerConfig(), SilenceVad(engine)) as server:
        turns = openai.OpenAI(base_url=f"{server.http}/v1", api_key="-", max_retries=0)
        cut = transcribe(turns, wav, response_format="verbose_json")
    assert [s.text for s in cut.segments] == [text_of(first), text_of(second)]
    assert cut.segments[1].start == second[0][1] and cut.text == plain.text


def test_a_stream_sends_each_word_then_the_text(
    client: openai.OpenAI, files: dict[str, Path], reference: dict
) -> None:
    events = list(transcribe(client, files["speech"], stream=True))
    *deltas, done = events
    words = reference["speech"]
    assert len(deltas) == len(words)
    assert all(isinstance(e, openai.types.audio.TranscriptionTextDeltaEvent) for e in deltas)
    assert isinstance(done, openai.types.audio.TranscriptionTextDoneEvent)
    assert [e.delta.strip() for e in deltas] == [w[0] for w in words]
    assert "".join(e.delta for e in deltas) == done.text == text_of(words)
    usage = done.usage
    assert usage is not None and usage.type == "tokens"
    assert usage.input_tokens >= round(5.0 * 12.5)  # a step per 80 ms frame, and the padding
    assert usage.output_tokens >= len(words)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_fields_the_model_cannot_use_are_named_in_a_header(
    client: openai.OpenAI, files: dict[str, Path]
) -> None:
    with files["speech"].open("rb") as f:
        raw = client.audio.transcriptions.with_raw_response.create(
            file=f,
            model="whisper-1",
            response_format="verbose_json",
            language="fr",
            prompt="Bonjour.",
            temperature=0.2,
        )
    assert raw.status_code == 200
    assert raw.headers[IGNORED_HEADER] == "language, prompt, temperature"
    result = raw.parse()
    assert result.language == "fr" and result.text == transcribe(client, files["speech"]).text
    with files["speech"].open("rb") as f:
        plain = client.audio.transcriptions.with_raw_response.create(file=f, model="whisper-1")
    assert IGNORED_HEADER not in plain.headers


def test_models_lists_the_loaded_checkpoint(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == ("ckpt", "model", "dsm-stt")
    assert client.models.retrieve("whisper-1").id == "ckpt"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o-transcribe-diarize")
    assert set(missing.value.body) == ERROR_FIELDS  # type: ignore[arg-type]
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


@pytest.mark.parametrize(
    ("loaded", "ident", "short"),
    [
        ("kyutai/stt-1b-en_fr", "kyutai/stt-1b-en_fr", "stt-1b-en_fr"),
        ("/srv/models/ckpt/", "ckpt", "ckpt"),  # no server path in the id
        ("hf://kyutai/stt-1b-en_fr-candle/model.safetensors", "kyutai/stt-1b-en_fr-candle", ""),
        ("/srv/models/stt/model.safetensors", "stt", "stt"),
    ],
)
def test_model_names(loaded: str, ident: str, short: str) -> None:
    names = ModelNames.of(loaded)
    assert names.id == ident
    for name in (loaded, ident, short or ident.split("/")[-1], *OPENAI_MODELS):
        assert names.resolve(name) == ident
    assert names.resolve("gpt-4o-transcribe-diarize") is None
    assert names.resolve("other/model") is None


# --------------------------------------------------------------------------------------------
# errors


def unknown_codec_wav() -> bytes:
    """A WAV whose format tag names no codec FFmpeg has."""
    data = b"\x01\x02" * 24000
    fmt = struct.pack("<HHIIHH", 0x1234, 1, 24000, 48000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def error_of(call: Callable[[], object], status: int) -> dict[str, Any]:
    with pytest.raises(openai.APIStatusError) as failed:
        call()
    assert failed.value.status_code == status
    body = failed.value.body
    assert isinstance(body, dict) and set(body) == ERROR_FIELDS, body
    return body


def test_bad_requests_get_the_documented_status_and_error_shape(
    server: Any, client: openai.OpenAI, files: dict[str, Path]
) -> None:
    url = f"{server.http}/v1/audio/transcriptions"
    auth = {"Authorization": f"Bearer {KEY}"}
    wav = files["speech"].read_bytes()

    def create(file: object = None, **options: Any) -> Callable[[], object]:
        options = {"model": "whisper-1"} | options
        return lambda: client.audio.transcriptions.create(file=file or wav, **options)

    no_file = httpx.post(url, headers=auth, files={"model": (None, "whisper-1")}, timeout=10)
    assert no_file.status_code == 400
    assert no_file.json()["error"]["param"] == "file"
    assert set(no_file.json()["error"]) == ERROR_FIELDS
    not_form = httpx.post(url, headers=auth, json={"model": "whisper-1"}, timeout=10)
    assert (
        not_form.status_code == 400 and not_form.json()["error"]["code"] == "invalid_content_type"
    )

    bad_model = error_of(create(model="whisper-2"), 400)
    assert bad_model["param"] == "model" and "'ckpt'" in bad_model["message"]
    assert bad_model["type"] == "invalid_request_error"
    assert error_of(create(response_format="xml"), 400)["param"] == "response_format"
    assert error_of(create(timestamp_granularities=["char"]), 400)["param"] == (
        "timestamp_granularities"
    )
    assert error_of(create(stream="maybe"), 400)["param"] == "stream"
    assert error_of(create(temperature="warm"), 400)["param"] == "temperature"
    corrupt = error_of(create(("a.wav", b"not audio at all" * 100)), 400)
    assert corrupt["code"] == "invalid_audio" and corrupt["message"].startswith("a.wav: ")
    empty = error_of(create(("a.wav", b"")), 400)
    assert empty["code"] == "invalid_audio" and "empty" in empty["message"]
    codec = error_of(create(("odd.wav", unknown_codec_wav())), 415)
    assert codec["code"] == "unsupported_codec"
    assert "WAV" in codec["message"] and "codec FFmpeg cannot decode" in codec["message"]
    big = error_of(create(("big.wav", wav + bytes(1_200_000))), 413)
    assert big["code"] == "file_too_large" and "1 MiB (--max-upload-mb)" in big["message"]

    stranger = openai.OpenAI(base_url=f"{server.http}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        stranger.audio.transcriptions.create(file=wav, model="whisper-1")
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    # moshi-server's key header is a key too
    moshi_key = httpx.post(
        url,
        headers={"kyutai-api-key": KEY},
        files={"file": ("a.wav", wav), "model": (None, "whisper-1")},
        timeout=60,
    )
    assert moshi_key.status_code == 200 and moshi_key.json()["text"]
    assert server.used_slots() == 0


# --------------------------------------------------------------------------------------------
# slots, clients that leave, shutdown


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return thread, out


def post_file(server: Any, wav: bytes, **fields: str) -> httpx.Response:
    form = {"file": ("a.wav", wav), "model": (None, "whisper-1")}
    form |= {k: (None, v) for k, v in fields.items()}
    return httpx.post(f"{server.http}/v1/audio/transcriptions", files=form, timeout=60)


def file_slots_used(server: Any) -> float:
    text = server.get("/metrics").text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("asr_file_slots_used ")]
    return float(line.split()[1])


def test_files_leave_slots_to_live_sessions(
    engine: Engine, files: dict[str, Path], reference: dict
) -> None:
    """``max_file_slots=1``: while one file runs, a second file waits its turn (503 after
    ``post_queue_timeout``) but a live session is admitted at once; the file is unharmed."""
    wav = files["speech"].read_bytes()
    config = ServerConfig(max_file_slots=1, post_queue_timeout=0.3)
    with threaded_server(config, SlowEngine(engine, 0.03)) as server:
        first, answers = in_thread(lambda: post_file(server, wav))
        assert eventually(lambda: server.used_slots() == 1), "the file never took a slot"
        assert file_slots_used(server) == 1
        second = post_file(server, wav)
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "no_free_slots"
        moshi_post = httpx.post(f"{server.http}{config.path}", content=wav, timeout=10)
        assert moshi_post.status_code == 503  # the moshi-style POST shares the cap

        async def live() -> str:
            async with await connect(server.url) as ws:
                return (await recv(ws))["type"]

        assert asyncio.run(live()) == "Ready"
        first.join(30)
        assert answers[0].status_code == 200
        assert answers[0].json()["text"] == text_of(reference["speech"])
        assert eventually(lambda: server.used_slots() == 0)
        assert file_slots_used(server) == 0


def test_a_client_that_leaves_frees_its_slot_and_a_shutdown_lets_a_file_finish(
    engine: Engine, files: dict[str, Path], reference: dict
) -> None:
    wav = files["speech"].read_bytes()
    with threaded_server(ServerConfig(), SlowEngine(engine, 0.03)) as server:
        url = f"{server.http}/v1/audio/transcriptions"
        form = {"file": ("a.wav", wav), "model": (None, "whisper-1"), "stream": (None, "true")}
        with httpx.stream("POST", url, files=form, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()  # (dropping this iterator would close the response)
            first = next(lines)
            assert first.startswith("data: ") and "transcript.text.delta" in first
            assert server.used_slots() == 1
        start = time.monotonic()  # the client left mid-transcription
        assert eventually(lambda: server.used_slots() == 0, timeout=3.0)
        assert time.monotonic() - start < 1.5
        assert file_slots_used(server) == 0

        running, answers = in_thread(lambda: post_file(server, wav, response_format="text"))
        assert eventually(lambda: server.used_slots() == 1)
        ctx = server.context
        drained = asyncio.run_coroutine_threadsafe(ctx.drain(), ctx.loop)
        assert eventually(lambda: not ctx.accepting)
        late = post_file(server, wav)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        running.join(30)
        assert answers[0].status_code == 200
        assert answers[0].text == text_of(reference["speech"]) + "\n"
        drained.result(10)


def test_an_upload_in_pieces_of_unknown_length(server: Any, files: dict[str, Path]) -> None:
    """A body sent in pieces with no declared length is parsed as it comes, and refused with
    413 once it passes the limit."""
    wav = files["speech"].read_bytes()
    boundary = "dsmsttboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body(payload: bytes, pieces: int) -> Iterator[bytes]:
        data = head + payload + tail
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            yield data[i : i + step]

    headers = {
        "Authorization": f"Bearer {KEY}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    url = f"{server.http}/v1/audio/transcriptions"
    ok = httpx.post(url, headers=headers, content=body(wav, 7), timeout=60)
    assert ok.status_code == 200 and ok.json()["text"] == transcribe_text(server, wav)
    too_big = httpx.post(url, headers=headers, content=body(bytes(3 * 2**20), 32), timeout=60)
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == "file_too_large"


def transcribe_text(server: Any, wav: bytes) -> str:
    form = {"file": ("a.wav", wav), "model": (None, "whisper-1")}
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{server.http}/v1/audio/transcriptions"
    return httpx.post(url, headers=headers, files=form, timeout=60).json()["text"]
