"""The Python client and the ``stream`` / ``mic`` commands, against a server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from engine_support import exact_config
from server_support import (
    reference_words,
    silence,
    speechlike,
    threaded_server,
    words_of,
    write_talkative_checkpoint,
    write_wav,
)

from dsm_stt.cli import main
from dsm_stt.client import ConnectionLost, LivePrinter, ServerError, SttClient, stream_audio
from dsm_stt.engine.engine import Engine
from dsm_stt.loading import load_engine
from dsm_stt.server.config import ServerConfig
from dsm_stt.server.protocol import EndWord, Flushed, Marker, Ready, Step, Word

pytestmark = pytest.mark.timeout(120)

SPEECH = np.concatenate([silence(1.0), speechlike(3.0, seed=1)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Engine, Path, list]:
    folder = tmp_path_factory.mktemp("client")
    checkpoint = write_talkative_checkpoint(folder / "ckpt")
    engine = load_engine(str(checkpoint), exact_config(batch_size=2))
    wav = write_wav(folder / "speech.wav", SPEECH)
    (expected,) = reference_words(checkpoint, [wav], 2)
    assert len(expected) >= 5
    return checkpoint, engine, wav, expected


def test_stream_audio_yields_the_words_until_the_marker(setup: tuple) -> None:
    _, engine, _, expected = setup

    async def collect(url: str) -> list:
        return [msg async for msg in stream_audio(url, SPEECH, rtf=1000.0, marker_id=5)]

    with threaded_server(ServerConfig(), engine) as server:
        msgs = asyncio.run(collect(server.url))
    assert not any(isinstance(m, Marker) for m in msgs)  # the end marker is consumed
    assert any(isinstance(m, Step) for m in msgs)
    got = words_of(msgs)
    # Every word; the last one's EndWord only comes with a WORD token after it.
    assert [w[:2] for w in got] == [w[:2] for w in expected]


def test_client_session_flush_init_and_refusals(setup: tuple) -> None:
    _, engine, _, expected = setup

    async def main_(url: str) -> None:
        with pytest.raises(ServerError, match="HTTP 401"):
            await SttClient.connect(url)
        async with await SttClient.connect(url, api_key="k") as client:
            for i in range(0, SPEECH.size, 1920):
                await client.send_audio(SPEECH[i : i + 1920])
            await client.send_flush(3)
            msgs = []
            async for msg in client:
                msgs.append(msg)
                if isinstance(msg, Flushed):
                    break
            assert msgs[-1] == Flushed(3)
            assert words_of(msgs) == expected
            await client.send_init()
            while not isinstance(await client.receive(), Ready):
                pass
            await client.send_marker(8)
            await client.send_audio(np.zeros(1920 * 8, np.float32))
            assert any([isinstance(await client.receive(), Marker) for _ in range(9)])
            other = await SttClient.connect(url, api_key="k")
            with pytest.raises(ServerError, match="no free channels"):
                await SttClient.connect(url, api_key="k")
            await other.close()

    with threaded_server(ServerConfig(api_keys=("k",)), engine) as server:
        asyncio.run(main_(server.url))


def test_stream_command_prints_the_words(setup: tuple, capsys: pytest.CaptureFixture) -> None:
    _, engine, wav, expected = setup
    with threaded_server(ServerConfig(), engine) as server:
        args = ["stream", str(wav), "--url", server.url, "--rtf", "1000", "--prefix", "0"]
        assert main([*args, "--timestamps"]) == 0
        rows = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()]
        assert [(text, float(start)) for start, _, text in rows] == [w[:2] for w in expected]
        ends = [None if end == "-" else float(end) for _, end, _ in rows]
        assert ends[:-1] == [w[2] for w in expected[:-1]]
        assert main(args) == 0  # live text
        assert capsys.readouterr().out.split() == " ".join(w[0] for w in expected).split()
        assert main(["stream", str(wav), "--url", server.url + "x", "--rtf", "1000"]) == 2
        assert "HTTP 403" in capsys.readouterr().err  # unknown WebSocket route


def test_stream_command_reports_unreadable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nothing here")
    assert main(["stream", str(bad), "--url", "ws://127.0.0.1:9/api/asr-streaming"]) == 2
    assert "bad.wav" in capsys.readouterr().err


def test_stream_audio_rejects_a_bad_rtf() -> None:
    async def first() -> None:
        async for _ in stream_audio("ws://127.0.0.1:9/x", SPEECH, rtf=0):
            pass

    with pytest.raises(ValueError, match="rtf must be > 0"):
        asyncio.run(first())


def test_live_printer_shows_turns_and_pauses() -> None:
    out = io.StringIO()
    printer = LivePrinter(out)
    for msg in [
        Step(0, (0.9, 0.9, 0.9, 0.9), 0),  # silence before anything was said: no pause mark
        Word("", 0.0),
        Word("hello", 0.1),
        EndWord(0.5),
        Step(1, (0.1, 0.1, 0.2, 0.1), 0),
        Word("world", 0.5),
        Step(2, (0.1, 0.1, 0.8, 0.1), 0),  # end of turn
        Step(3, (0.1, 0.1, 0.9, 0.1), 0),  # printed once
        Word("again", 2.0),
    ]:
        printer.on_message(msg)
    printer.close()
    assert out.getvalue() == "> hello world [pause]\n> again \n"


def test_mic_without_sounddevice_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as if not installed
    assert main(["mic", "--url", "ws://127.0.0.1:9/api/asr-streaming"]) == 2
    err = capsys.readouterr().err
    # the package is not on an index: the extra installs from a checkout, sounddevice anywhere
    assert err == (
        "dsm-stt: error: the microphone needs the Python package 'sounddevice': pip install "
        "sounddevice (or, in a source checkout of dsm-stt, pip install '.[mic]')\n"
    )
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert 'mic = ["sounddevice' in pyproject.read_text()


def test_mic_without_portaudio_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # sounddevice raises OSError at import when the PortAudio library is missing
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    assert main(["mic", "--url", "ws://127.0.0.1:9/api/asr-streaming"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsm-stt: error: the microphone needs the")
    assert "PortAudio library not found" in err and "apt-get install libportaudio2" in err


class FakeSoundDevice:
    """Stands in for the ``sounddevice`` module: an input stream that plays ``pcm`` in blocks
    from a thread, like PortAudio's callback thread, then goes quiet."""

    def __init__(self, pcm: np.ndarray) -> None:
        self.pcm = pcm
        self.opened: dict = {}

    def InputStream(self, **kwargs: object) -> object:
        import threading

        self.opened = kwargs
        pcm, callback, block = self.pcm, kwargs["callback"], int(kwargs["blocksize"])  # type: ignore[call-overload]

        class Stream:
            def __enter__(self) -> Stream:
                self.closed = threading.Event()

                def play() -> None:
                    for i in range(0, pcm.size - block + 1, block):
                        if self.closed.is_set():  # as PortAudio: no callback once closed
                            return
                        callback(pcm[i : i + block, None], block, None, None)  # type: ignore[operator]

                self.thread = threading.Thread(target=play, daemon=True)
                self.thread.start()
                return self

            def __exit__(self, *exc: object) -> None:
                self.closed.set()
                self.thread.join(5)

        return Stream()


def test_mic_command_prints_a_live_transcript(
    setup: tuple, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _, engine, _, expected = setup
    fake = FakeSoundDevice(np.concatenate([SPEECH, silence(1.0)]))
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    # The fake microphone goes quiet after 5 s of audio: the server's audio timeout ends it.
    with threaded_server(ServerConfig(audio_timeout=1.0), engine) as server:
        assert main(["mic", "--url", server.url]) == 2
    out, err = capsys.readouterr()
    assert fake.opened["samplerate"] == 24000 and fake.opened["channels"] == 1
    assert "no audio received" in err
    printed = out.replace("[pause]", "").replace(">", "").split()
    words = " ".join(w[0] for w in expected).split()
    assert printed == words[: len(printed)] and len(printed) >= len(words) - 3


# --------------------------------------------------------------------------------------------
# a server that goes away: one line and a non-zero exit, for the client and both commands


@contextlib.contextmanager
def fake_server(ending: str, after: int = 3) -> Iterator[tuple[str, threading.Event]]:
    """A WebSocket server on a loopback port: Ready, then after ``after`` client messages it
    ends the connection as ``ending`` says: ``going-away`` (a clean 1001 close, as a server
    shutting down), ``drop`` (the TCP connection cut, no close frame: a server that died) or
    ``silent`` (never, and nothing more said). Yields its URL and an event set on connect."""
    from websockets.asyncio.server import serve

    from dsm_stt.server.protocol import encode_server_message

    connected = threading.Event()
    ready = threading.Event()
    url: list[str] = []
    stop: list[asyncio.Future] = []
    loop = asyncio.new_event_loop()

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.send(encode_server_message(Ready()))
        connected.set()
        seen = 0
        async for _ in ws:
            seen += 1
            if seen == after and ending == "going-away":
                await ws.close(1001, "the server is shutting down")
                return
            if seen == after and ending == "drop":
                ws.transport.abort()
                return

    async def run() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            url.append(f"ws://127.0.0.1:{port}/api/asr-streaming")
            stop.append(loop.create_future())
            ready.set()
            await stop[0]

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield url[0], connected
    finally:
        loop.call_soon_threadsafe(stop[0].set_result, None)
        thread.join(10)
        loop.close()


def test_stream_command_when_the_server_goes_away(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    wav = write_wav(tmp_path / "speech.wav", SPEECH)
    args = ["stream", str(wav), "--rtf", "1000", "--url"]
    with fake_server("going-away") as (url, _):
        assert main([*args, url]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dsm-stt: error: the server at {url} went away (1001: the server is shutting down)\n"
    )
    with fake_server("drop") as (url, _):
        assert main([*args, url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"dsm-stt: error: lost the connection to {url} (no close frame")
    # nothing listening: refused at once, with what to do
    assert main([*args, "ws://127.0.0.1:9/api/asr-streaming"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "dsm-stt: error: cannot connect to ws://127.0.0.1:9/api/asr-streaming: connection "
        "refused: is a server running there? ('dsm-stt serve' starts one)\n"
    )
    assert main([*args, "http://127.0.0.1:9/x"]) == 2
    assert "not a WebSocket URL" in capsys.readouterr().err


def test_stream_audio_raises_connection_lost() -> None:
    async def collect(url: str) -> list:
        return [m async for m in stream_audio(url, SPEECH, rtf=1000.0)]

    with fake_server("going-away") as (url, _), pytest.raises(ConnectionLost, match="1001"):
        asyncio.run(collect(url))
    assert issubclass(ConnectionLost, OSError)


def test_mic_command_when_the_server_goes_away(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", FakeSoundDevice(SPEECH))
    with fake_server("going-away") as (url, _):
        assert main(["mic", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"dsm-stt: error: the server at {url} went away (1001: the server is shutting down)\n"
    )
    with fake_server("drop") as (url, _):
        assert main(["mic", "--url", url]) == 2
    assert "dsm-stt: error: lost the connection to" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "speech.wav", SPEECH)
    with fake_server("silent") as (url, connected):
        child = subprocess.Popen(
            [sys.executable, "-m", "dsm_stt", "stream", str(wav), "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert connected.wait(60)
            time.sleep(0.5)
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=30)
        finally:
            child.kill()
    assert child.returncode == 130
    assert err == "dsm-stt: interrupted\n"
