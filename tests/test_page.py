"""The browser page (``server/page.py``, ``server/page/``): its routes without a browser, then the
page itself in headless Chromium against a server on the tiny turn checkpoint.

In the browser: a fake microphone plays a generated WAV; the words the page shows are the words
the server sent it, and the same audio sent again by a plain client gives exactly those words
(and the page's JSON download holds them with their times); the VAD meter follows the ``Step``
messages, and turns close as the server's ends of turn say; the audio sent is the WAV's,
resampled to 24 kHz. A picked and a dropped file show the server's words for them, and the
SRT download is the server's SRT for that file. A wrong key, a full server, a denied
microphone and a dropped connection each show their message. Screenshots land in the test's
folder and in ``test-artifacts/page/``.

Without Chromium (Debian's ``chromium``; ``.ci/run`` installs it when it can) or Playwright the
browser tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
from engine_support import exact_config
from server_support import (
    events,
    threaded_server,
    transcribe_session,
    words_of,
    write_wav,
)
from starlette.testclient import TestClient
from turn_support import turn_signal, write_turn_checkpoint

from dsm_stt.engine.engine import Engine
from dsm_stt.engine.events import EndWord, Word
from dsm_stt.loading import load_engine
from dsm_stt.server.app import create_app
from dsm_stt.server.config import ServerConfig
from dsm_stt.writers import TimedWord, Transcript, render

pytestmark = pytest.mark.timeout(180)

KEY = "page-key"
PAGE = Path(__file__).resolve().parents[1] / "dsm_stt" / "server" / "page"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "page"
ROUTE_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


# --------------------------------------------------------------------------------------------
# the routes, without a browser


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_turn_checkpoint(tmp_path_factory.mktemp("turns") / "ckpt")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return load_engine(str(checkpoint), exact_config(batch_size=2))


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[Any]:
    with threaded_server(ServerConfig(api_keys=(KEY,)), engine) as running:
        yield running


def _served(server: Any, path: str) -> httpx.Response:
    answer = server.get(path)
    assert answer.status_code == 200, (path, answer.status_code, answer.text)
    return answer


def test_the_page_and_every_file_it_loads_are_served_with_their_types(server: Any) -> None:
    html = _served(server, "/")
    assert html.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in html.headers["content-security-policy"]
    assert _served(server, "/page/").text == html.text
    # every file the page refers to, and every module those import, is served: nothing dangles,
    # and nothing comes from another host (no CDN)
    wanted = set(re.findall(r'(?:src|href)="([^"]+)"', html.text)) - {"data:,"}
    assert wanted == {"/page/style.css", "/page/app.js"}
    seen: set[str] = set()
    while wanted:
        path = wanted.pop()
        seen.add(path)
        answer = _served(server, path)
        assert answer.headers["content-type"].startswith(ROUTE_TYPES[Path(path).suffix]), path
        assert answer.headers["x-content-type-options"] == "nosniff"
        if path.endswith(".js"):
            imported = re.findall(r'from "\./([\w.]+)"|new URL\("\./([\w.]+)"', answer.text)
            wanted |= {f"/page/{a or b}" for a, b in imported} - seen
    assert seen == {f"/page/{p.name}" for p in PAGE.iterdir() if p.suffix != ".html"}
    assert server.get("/page/nothing.js").status_code == 404
    assert server.get("/page/..%2Fpage.py").status_code == 404


def test_the_page_config_says_where_the_socket_is(server: Any, engine: Engine) -> None:
    config = _served(server, "/page-config.json").json()
    assert config["ws_path"] == "/api/asr-streaming"
    assert config["auth_required"] is True
    assert config["file_route"] == "/v1/audio/transcriptions"
    assert config["model"] == "ckpt"  # the directory's name, never its path on the server
    assert config["sample_rate"] == 24000 and config["frame_size"] == 1920
    assert config["frame_rate"] == 12.5
    assert config["delay_seconds"] == pytest.approx(
        engine.model.config.stt.asr_delay_in_tokens / 12.5
    )
    assert config["vad"] is True
    assert config["end_of_turn"]["head"] == 2 and config["end_of_turn"]["threshold"] == 0.5
    # the key check the page uses when its socket fails
    assert server.get("/page/key").status_code == 401
    assert server.get("/page/key", headers={"kyutai-api-key": "wrong"}).status_code == 401
    assert server.get("/page/key", headers={"kyutai-api-key": KEY}).status_code == 204
    assert server.get(f"/page/key?auth_id={KEY}").status_code == 204


def test_a_custom_path_an_open_server_and_an_operators_static_dir(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<p>the operator's page</p>")
    config = ServerConfig(
        model="tiny", random_weights=True, path="/stt/live", static_dir=str(tmp_path)
    )
    with TestClient(create_app(config.replace(engine=exact_config(batch_size=1)))) as client:
        page = client.get("/page-config.json").json()
        assert page["ws_path"] == "/stt/live" and page["auth_required"] is False
        assert page["file_route"] == "/v1/audio/transcriptions"
        # static_dir keeps / (moshi-server's meaning); the page stays at /page/
        assert client.get("/").text == "<p>the operator's page</p>"
        assert "/page/app.js" in client.get("/page/").text


def test_render_writes_what_transcribe_writes(server: Any) -> None:
    words = [
        TimedWord("Hello,", 0.32, 0.8),
        TimedWord("world.", 0.8, 1.44),
        TimedWord("A", 2.96, 3.2),
        TimedWord("new cue", 3.2, None),
    ]
    body = {
        "words": [{"text": w.text, "start": w.start, "end": w.end} for w in words],
        "duration": 4.0,
        "model": "ckpt",
    }
    transcript = Transcript(" ".join(w.text for w in words), words, 4.0, "ckpt")
    headers = {"kyutai-api-key": KEY}
    for fmt in ("srt", "vtt", "json"):
        answer = server.post(f"/page/render?format={fmt}", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.text == render(transcript, fmt)
    assert server.post("/page/render?format=srt", json=body).status_code == 401
    assert server.post("/page/render?format=doc", json=body, headers=headers).status_code == 400
    backwards = {"words": [{"text": "b", "start": 2.0}, {"text": "a", "start": 1.0}]}
    bad = server.post("/page/render?format=srt", json=backwards, headers=headers)
    assert bad.status_code == 400 and "must not decrease" in bad.text
    for junk in ([1, 2], {"words": [{"text": 3, "start": 0}]}, {"words": [{"start": 0}]}):
        answer = server.post("/page/render?format=srt", json=junk, headers=headers)
        assert answer.status_code == 400, junk


def test_the_page_files_are_package_data() -> None:
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"dsm_stt\.server"\s*=\s*\[[^\]]*"page/\*\.html"', text)
    for suffix in ("js", "css"):
        assert f'"page/*.{suffix}"' in text
    assert {p.suffix for p in PAGE.iterdir()} <= set(ROUTE_TYPES)


# --------------------------------------------------------------------------------------------
# in Chromium


def _chromium() -> str | None:
    given = os.environ.get("DSM_STT_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install playwright)")
    if _chromium() is None:
        pytest.skip(
            "Chromium is not installed (apt-get install chromium, or DSM_STT_CHROMIUM=PATH): "
            "the page's browser tests need it"
        )
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def mic_audio(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path]:
    """What the fake microphone says: two bursts of speech, each followed by a silence."""
    parts = [("silence", 0.5), ("speech", 2.5), ("silence", 1.6), ("speech", 2.0), ("silence", 1.6)]
    pcm = turn_signal(parts, seed=40)
    return pcm, write_wav(tmp_path_factory.mktemp("mic") / "mic.wav", pcm)


def _launch(playwright: Any, *extra: str) -> Any:
    args = ["--autoplay-policy=no-user-gesture-required", *extra]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root otherwise
    return playwright.chromium.launch(executable_path=_chromium(), args=args)


@pytest.fixture(scope="module")
def browser(playwright: Any, mic_audio: tuple[np.ndarray, Path]) -> Iterator[Any]:
    wav = mic_audio[1]
    fake = (
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
    )
    browser = _launch(playwright, *fake)
    try:
        yield browser
    finally:
        browser.close()


class Page:
    """One tab on the page, with what went over its WebSocket and what the page logged."""

    def __init__(self, browser: Any, server: Any, **context: Any) -> None:
        self.context = browser.new_context(accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.sent: list[dict] = []
        self.received: list[dict] = []
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("websocket", self._watch)
        self.page.goto(server.http + "/")
        self.page.wait_for_selector("body[data-ready=true]", state="attached", timeout=10_000)

    def _watch(self, ws: Any) -> None:
        ws.on("framesent", lambda data: self.sent.append(msgpack.unpackb(data)))
        ws.on("framereceived", lambda data: self.received.append(msgpack.unpackb(data)))

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; page errors: {self.errors}")
            self.page.wait_for_timeout(50)

    def status(self) -> str:
        return self.page.text_content("#status") or ""

    def message(self) -> tuple[str | None, str]:
        box = self.page.locator("#message")
        if not box.is_visible():
            return None, ""
        return box.get_attribute("data-kind"), box.text_content() or ""

    def words(self) -> list[str]:
        return self.page.locator("#transcript .word").all_text_contents()

    def turns(self) -> list[list[str]]:
        return [
            p.locator(".word").all_text_contents()
            for p in self.page.locator("#transcript .turn").all()
        ]

    def download(self, selector: str) -> str:
        with self.page.expect_download(timeout=20_000) as info:
            self.page.click(selector)
        return Path(info.value.path()).read_text(encoding="utf-8")

    def screenshot(self, folder: Path, name: str) -> None:
        path = folder / name
        self.page.screenshot(path=str(path), full_page=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ARTIFACTS / name)

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def open_page(browser: Any, server: Any, key: str | None = KEY, **context: Any) -> Iterator[Page]:
    page = Page(browser, server, **context)
    try:
        if key is not None:
            page.page.fill("#api-key", key)
        yield page
        assert page.errors == []
    finally:
        page.close()


def expected_turns(received: list[dict]) -> list[list]:
    """The paragraphs the page must show for these server messages: a turn opens at a word and
    closes at the server's ``EndOfTurn``; a word that started before the end of the last
    closed turn belongs to it (it came out the text delay after its audio)."""
    turns: list[dict] = []
    for m in received:
        if m["type"] == "Word" and m["text"].strip():
            start = max(0.0, m["start_time"])
            last = turns[-1] if turns else None
            if last is not None and (not last["closed"] or start < last["end"]):
                last["words"].append(m["text"].strip())
            else:
                turns.append({"words": [m["text"].strip()], "closed": False, "end": None})
        elif m["type"] == "EndOfTurn" and turns and not turns[-1]["closed"]:
            turns[-1].update(closed=True, end=m["time"])
    return [t["words"] for t in turns]


def _sent_audio(sent: list[dict]) -> np.ndarray:
    frames = [np.asarray(m["pcm"], dtype=np.float32) for m in sent if m["type"] == "Audio"]
    assert frames and all(f.size == 1920 for f in frames)
    return np.concatenate(frames)


def _segment_correlations(sent: np.ndarray, wav: np.ndarray, seconds: float = 0.5) -> list[float]:
    """``_best_correlation`` of each ``seconds`` of the WAV that is not silence, on its own."""
    size = int(seconds * 24000)
    pieces = [wav[i : i + size] for i in range(0, wav.size - size + 1, size)]
    return [_best_correlation(sent, piece) for piece in pieces if np.abs(piece).max() > 0.05]


def _best_correlation(sent: np.ndarray, wav: np.ndarray) -> float:
    """The highest normalised correlation of the WAV with the sent audio at any lag (the page
    sends from its Ready on, so the WAV may have started before the first frame sent)."""
    n = 1 << int(np.ceil(np.log2(sent.size + wav.size)))
    corr = np.fft.irfft(np.fft.rfft(sent, n) * np.conj(np.fft.rfft(wav, n)), n)
    lag = int(np.argmax(corr))
    if lag > n // 2:  # the WAV began before the first frame sent
        a, b = sent, wav[n - lag :]
    else:
        a, b = sent[lag:], wav
    size = min(a.size, b.size)
    a, b = a[:size], b[:size]
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def test_the_microphone_streams_words_turns_and_the_vad(
    browser: Any, server: Any, mic_audio: tuple[np.ndarray, Path], tmp_path: Path
) -> None:
    wav = mic_audio[0]
    with open_page(browser, server) as tab:
        assert tab.page.is_visible("#api-key")  # the server has keys: the field shows
        tab.page.click("#start")
        tab.wait(lambda: "Listening" in tab.status(), "Ready")
        meter: set[float] = set()
        shot = False
        deadline = time.monotonic() + 45
        # until the whole WAV has been sent and the second turn closed, and (on a loaded
        # machine the server's words lag the frames sent) the screenshot of the second turn
        # taken while its words arrive: the microphone keeps sending silence after the WAV
        while (
            len(tab.sent) * 1920 < wav.size + 12 * 1920 or not shot
        ) and time.monotonic() < deadline:
            meter.add(float(tab.page.get_attribute("#vad", "aria-valuenow") or 0))
            live = tab.page.locator("#transcript .turn.live .word").count()
            if not shot and len(tab.turns()) >= 2 and live >= 1:
                # a closed turn, and the next one's words arriving
                tab.screenshot(tmp_path, "mic-mid-stream.png")
                shot = True
            tab.page.wait_for_timeout(100)
        tab.page.click("#stop")
        tab.wait(lambda: tab.status() == "Stopped.", "the end of the session")
        tab.page.wait_for_timeout(200)  # the last frames' events
        assert shot and tab.message() == (None, "")

        # the words on the page are the words the server sent, in its turns
        said = [m for m in tab.received if m["type"] == "Word" and m["text"].strip()]
        assert len(said) >= 6
        assert tab.words() == [m["text"].strip() for m in said]
        turns = tab.turns()
        assert turns == expected_turns(tab.received)
        assert len(turns) >= 2  # a turn closed in the first silence
        assert tab.page.locator("#transcript .turn.live").count() == 0  # Stop closes the last
        # the server decided them: the page asked for EndOfTurn, one for each silence
        assert sum(m["type"] == "EndOfTurn" for m in tab.received) >= 2

        # the meter showed both sides of the threshold, and shows the last Step now
        steps = [m for m in tab.received if m["type"] == "Step"]
        assert min(meter) < 0.5 <= max(meter), meter
        last = float(tab.page.get_attribute("#vad", "aria-valuenow"))  # type: ignore[arg-type]
        assert last == pytest.approx(min(1.0, steps[-1]["prs"][2]), abs=1e-3)

        # the latency, speech to word: at least the model's delay, at most a few seconds
        latency = int(tab.page.get_attribute("#latency", "data-ms"))  # type: ignore[arg-type]
        delay = 1000 * server.context.engine.model.config.stt.asr_delay_in_tokens / 12.5
        assert delay - 100 <= latency < 8000, latency
        assert "median" in (tab.page.text_content("#latency-note") or "")

        # the audio sent is the WAV's, at 24 kHz, in 1920-sample Audio frames
        sent = _sent_audio(tab.sent)
        # each 0.5 s of the WAV's speech is in it (Chromium's fake capture can drop a buffer
        # on a loaded machine, which shifts the rest: a single alignment would not hold)
        found = _segment_correlations(sent, wav)
        assert len(found) >= 6 and float(np.median(found)) > 0.9, found
        assert [m["type"] for m in tab.sent][-1] == "Flush"

        # the same audio from a plain client: the same words, which the JSON download holds
        replay = _run(transcribe_session(server.url, sent, headers={"kyutai-api-key": KEY}))
        assert [w[0] for w in replay] == tab.words()
        assert words_of(events(tab.received)) == replay
        saved = json.loads(tab.download("[data-download=json]"))
        assert [(w["text"], w["start"], w["end"]) for w in saved["words"]] == replay
        text = tab.download("[data-download=txt]")
        assert text == "\n\n".join(" ".join(t) for t in turns) + "\n"


def _run(coro: Any) -> Any:
    """``coro`` run to its end in a thread of its own (Playwright's loop holds this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _reference_words(server: Any, path: Path) -> list[tuple[str, float, float | None]]:
    """The server's words for a file, through moshi-server's POST route."""
    answer = server.post(
        "/api/asr-streaming", content=path.read_bytes(), headers={"kyutai-api-key": KEY}
    )
    assert answer.status_code == 200, answer.text
    evs = [
        Word(m["text"], m["start_time"]) if m["type"] == "Word" else EndWord(m["stop_time"])
        for m in answer.json()
    ]
    return words_of(evs)


def _server_srt(server: Any, path: Path) -> str:
    answer = server.post(
        "/v1/audio/transcriptions",
        files={"file": (path.name, path.read_bytes(), "audio/wav")},
        data={"model": "whisper-1", "response_format": "srt"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.status_code == 200, answer.text
    return answer.text


def test_a_picked_and_a_dropped_file_show_their_words_and_download_as_srt(
    browser: Any, server: Any, tmp_path: Path
) -> None:
    picked = write_wav(
        tmp_path / "picked.wav",
        turn_signal([("silence", 0.5), ("speech", 2.5), ("silence", 1.2), ("speech", 1.5)], 50),
    )
    dropped = write_wav(
        tmp_path / "dropped.wav", turn_signal([("silence", 0.3), ("speech", 2.5)], seed=60)
    )
    with open_page(browser, server) as tab:
        tab.page.set_input_files("#file", str(picked))
        tab.wait(lambda: "words." in (tab.page.text_content("#file-status") or ""), "the file")
        expected = _reference_words(server, picked)
        assert len(expected) >= 4
        assert tab.words() == [w[0] for w in expected]
        assert tab.page.text_content("#source") == "picked.wav"
        srt = tab.download("[data-download=srt]")
        assert srt == _server_srt(server, picked)
        cues = [line for line in srt.splitlines() if line and not re.match(r"\d+$|\d\d:", line)]
        assert " ".join(cues).split() == " ".join(w[0] for w in expected).split()
        assert tab.words() == [w[0] for w in expected]  # now in the server's segments
        tab.screenshot(tmp_path, "file-done.png")

        data = base64.b64encode(dropped.read_bytes()).decode()
        transfer = tab.page.evaluate_handle(
            """([data, name]) => {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
                return transfer;
            }""",
            [data, "dropped.wav"],
        )
        tab.page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
        tab.wait(lambda: tab.page.text_content("#source") == "dropped.wav", "the drop")
        tab.wait(lambda: "words." in (tab.page.text_content("#file-status") or ""), "the file")
        assert tab.words() == [w[0] for w in _reference_words(server, dropped)]


def test_a_wrong_key_is_named(browser: Any, server: Any, tmp_path: Path) -> None:
    with open_page(browser, server, key="not-the-key") as tab:
        tab.page.click("#start")
        tab.wait(lambda: tab.message()[0] is not None, "the message")
        kind, text = tab.message()
        assert kind == "key" and "refused the API key" in text, text
        assert tab.page.evaluate("document.activeElement.id") == "api-key"
        assert tab.status() == "Not connected." and not tab.page.is_enabled("#stop")
        short = write_wav(tmp_path / "a.wav", turn_signal([("speech", 1.0)]))
        tab.page.set_input_files("#file", str(short))
        tab.wait(lambda: tab.message()[0] == "key", "the file's refusal")
    with open_page(browser, server, key=None) as tab:
        tab.page.click("#start")
        kind, text = tab.message()
        assert kind == "key" and "needs an API key" in text


def test_a_full_server_says_so_and_reconnect_gets_in_once_a_slot_frees(
    browser: Any, server: Any, tmp_path: Path
) -> None:
    from websockets.sync.client import connect

    others = []
    try:
        for _ in range(server.context.engine.batch_size):
            ws = connect(server.url, additional_headers={"kyutai-api-key": KEY})
            assert msgpack.unpackb(ws.recv(timeout=10))["type"] == "Ready"
            others.append(ws)
        with open_page(browser, server) as tab:
            tab.page.click("#start")
            tab.wait(lambda: tab.message()[0] is not None, "the message")
            kind, text = tab.message()
            assert kind == "full" and "server is full" in text, text
            assert tab.page.is_visible("#reconnect")
            tab.screenshot(tmp_path, "server-full.png")
            for ws in others:
                ws.close()
            others.clear()
            tab.wait(lambda: server.used_slots() == 0, "the slots to free")
            tab.page.click("#reconnect")
            tab.wait(lambda: "Listening" in tab.status(), "Ready after the reconnect")
            assert tab.message() == (None, "") and not tab.page.is_visible("#reconnect")
            tab.page.click("#stop")
            tab.wait(lambda: tab.status() == "Stopped.", "the stop")
    finally:
        for ws in others:
            ws.close()


def test_a_dropped_connection_is_named_and_reconnect_resumes(browser: Any, server: Any) -> None:
    with open_page(browser, server) as tab:
        tab.page.click("#start")
        tab.wait(lambda: "Listening" in tab.status(), "Ready")
        tab.wait(lambda: len(tab.sent) >= 3, "some audio")
        (session,) = server.context.sessions
        loop = server.context.loop
        asyncio.run_coroutine_threadsafe(session.ws.close(1011, "test drop"), loop).result(5)
        tab.wait(lambda: tab.message()[0] == "dropped", "the message")
        assert "connection dropped (code 1011: test drop)" in tab.message()[1]
        assert tab.page.is_visible("#reconnect") and tab.page.is_enabled("#start")
        tab.page.click("#reconnect")
        tab.wait(lambda: "Listening" in tab.status(), "Ready after the reconnect")
        tab.page.click("#stop")
        tab.wait(lambda: tab.status() == "Stopped.", "the stop")


def test_a_denied_microphone_is_named(playwright: Any, server: Any) -> None:
    # a (fake) microphone, but no fake permission prompt: headless Chromium says no
    browser = _launch(playwright, "--use-fake-device-for-media-stream")
    try:
        with open_page(browser, server) as tab:
            tab.page.click("#start")
            tab.wait(lambda: tab.message()[0] is not None, "the message")
            kind, text = tab.message()
            assert kind == "mic" and "denied" in text, text
            assert not tab.page.is_enabled("#stop") and tab.page.is_enabled("#start")
    finally:
        browser.close()


def test_small_screens_and_dark_mode(browser: Any, server: Any, tmp_path: Path) -> None:
    phone = {"viewport": {"width": 390, "height": 844}, "color_scheme": "dark"}
    with open_page(browser, server, key=None, **phone) as tab:
        width = tab.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390  # nothing wider than the screen
        background = tab.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 23, 26)"  # the dark palette
        # every control is reachable with Tab, in the order the page reads
        order = []
        for _ in range(6):
            tab.page.keyboard.press("Tab")
            order.append(tab.page.evaluate("document.activeElement.id"))
        assert order[:2] == ["api-key", "start"]
        tab.screenshot(tmp_path, "phone-dark.png")


def test_msgpack_js_reads_and_writes_what_python_msgpack_does(browser: Any, server: Any) -> None:
    values = [
        {"type": "Word", "text": "héllo 🌍", "start_time": 1.25},
        {"type": "Step", "step_idx": 70000, "prs": [0.5, 0.25], "buffered_pcm": 1920},
        [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53 - 1],
        [-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**53) + 1],
        {"s" * 40: "x" * 300, "nil": None, "t": True, "f": False, "nested": {"a": [1, [2]]}},
        "y" * 70000,
    ]
    with open_page(browser, server, key=None) as tab:
        for value, single in [(v, False) for v in values] + [(values[1], True)]:
            packed = base64.b64encode(msgpack.packb(value, use_single_float=single)).decode()
            decoded = tab.page.evaluate(
                """async (data) => {
                    const { decode } = await import("/page/msgpack.js");
                    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                    return decode(bytes);
                }""",
                packed,
            )
            assert decoded == value
            again = tab.page.evaluate(
                """async (value) => {
                    const { encode } = await import("/page/msgpack.js");
                    return Array.from(encode(value));
                }""",
                value,
            )
            assert msgpack.unpackb(bytes(again)) == value
        # the audio frame: a Float32Array becomes an array of float32, as Kyutai's clients send
        frame = tab.page.evaluate(
            """async () => {
                const { encode } = await import("/page/msgpack.js");
                const pcm = new Float32Array(1920).map((_, i) => Math.sin(i / 10));
                return Array.from(encode({ type: "Audio", pcm }));
            }"""
        )
        audio = msgpack.unpackb(bytes(frame))
        expected = np.sin(np.arange(1920) / 10).astype(np.float32)
        assert audio["type"] == "Audio" and np.array_equal(np.float32(audio["pcm"]), expected)
        assert bytes(frame) == msgpack.packb(
            {"type": "Audio", "pcm": expected.tolist()}, use_single_float=True
        )
        bin_value = tab.page.evaluate(
            """async () => {
                const { decode, encode } = await import("/page/msgpack.js");
                const back = decode(encode({ data: new Uint8Array([0, 1, 255]) }));
                return Array.from(back.data);
            }"""
        )
        assert bin_value == [0, 1, 255]


def test_the_page_loads_nothing_from_another_host() -> None:
    """No CDN, no font or script from elsewhere: the page works on a machine that is offline."""
    found = 0
    for path in PAGE.iterdir():
        text = path.read_text(encoding="utf-8")
        pattern = r'(?:src|href)="([^"]+)"|from "([^"]+)"|(?:import|URL)\("([^"]+)"|url\(([^)]+)\)'
        for groups in re.findall(pattern, text):
            (url,) = [g for g in groups if g]
            found += 1
            assert url.startswith(("/", "./", "data:")), (path.name, url)
    assert found >= 8  # the pattern sees the page's references


RESAMPLE = """async ([rate, freq]) => {
    const context = new OfflineAudioContext(1, rate, rate);  // one second at `rate`
    await context.audioWorklet.addModule("/page/worklet.js");
    const tone = new OscillatorNode(context, { frequency: freq });
    const node = new AudioWorkletNode(context, "dsm-capture", {
        processorOptions: { targetRate: 24000, frameSize: 1920 },
    });
    const frames = [];
    node.port.onmessage = (event) => frames.push(Array.from(event.data));
    tone.connect(node).connect(context.destination);
    tone.start();
    await context.startRendering();
    for (let i = 0; i < 50 && frames.length < 12; i++) {
        await new Promise((done) => setTimeout(done, 20));  // the last frames' messages
    }
    return frames.flat();
}"""


@pytest.mark.parametrize("rate", [48000, 44100, 16000])
def test_the_worklet_resamples_any_microphone_rate_to_24_khz(
    browser: Any, server: Any, rate: int
) -> None:
    with open_page(browser, server, key=None) as tab:
        # a tone in the speech band comes out at 24 kHz with its frequency and amplitude
        out = np.asarray(tab.page.evaluate(RESAMPLE, [rate, 997.0]))
        assert out.size == 12 * 1920  # 12 whole frames of the one second
        n = np.arange(out.size) / 24000
        steady = slice(480, None)  # past the filter's start
        basis = np.stack([np.sin(2 * np.pi * 997 * n), np.cos(2 * np.pi * 997 * n)], 1)[steady]
        fit, *_ = np.linalg.lstsq(basis, out[steady], rcond=None)
        assert np.hypot(*fit) == pytest.approx(1.0, abs=0.01)
        residual = out[steady] - basis @ fit
        assert np.sqrt(np.mean(residual**2)) < 0.005
        if rate > 24000:
            # a tone above the new Nyquist frequency does not fold back into the speech band
            high = np.asarray(tab.page.evaluate(RESAMPLE, [rate, 0.8 * rate / 2]))
            assert np.sqrt(np.mean(high[480:] ** 2)) < 0.01
