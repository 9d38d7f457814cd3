"""Third-party clients, unmodified, against ``dsm-stt serve``: LiveKit's Kyutai STT plugin
(``livekit-plugins-kyutai-lasuite``, from PyPI) must report exactly the words our own client gets
for the same audio.

Kyutai's and Unmute's file scripts are not on PyPI; ``bench/third_party.py`` runs them from
checkouts of their repositories.
"""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
from server_support import (
    FRAME,
    SAMPLE_RATE,
    ServerProcess,
    running_server,
    silence,
    speechlike,
    write_talkative_checkpoint,
)

from dsm_stt.client import stream_audio
from dsm_stt.server.protocol import Word

kyutai = pytest.importorskip(
    "lasuite.plugins.kyutai",
    reason="livekit-plugins-kyutai-lasuite is not installed (it is in the 'test' extra)",
)
aiohttp = pytest.importorskip("aiohttp")
rtc = pytest.importorskip("livekit.rtc")
lk_stt = pytest.importorskip("livekit.agents.stt")

pytestmark = pytest.mark.timeout(120)

KEY = "plugin-key"
# 0.5 s of silence, 8 s of speech-like sound, 2 s of silence: the model's delay (0.48 s) has
# passed before the audio ends, so every word is out once the last frame is stepped.
SIGNAL = np.concatenate([silence(0.5), speechlike(8.0, seed=3), silence(2.0)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    folder = tmp_path_factory.mktemp("third_party")
    checkpoint = write_talkative_checkpoint(folder / "ckpt")
    args = ["--model", str(checkpoint), "--exact", "--batch-size", "2", "--api-key", KEY]
    with running_server(args, folder / "server.log") as process:
        yield process


def steps_run(server: ServerProcess) -> float:
    text = server.get("/metrics").text
    return float(re.search(r"^asr_model_steps_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def wait_for_free_slots(server: ServerProcess, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.used_slots() != 0:
        assert time.monotonic() < deadline, "a slot stayed taken"
        time.sleep(0.05)


async def our_words(url: str) -> list[tuple[str, float]]:
    return [
        (m.text, m.start_time)
        async for m in stream_audio(url, SIGNAL, api_key=KEY, rtf=1000.0)
        if isinstance(m, Word)
    ]


async def plugin_words(server: ServerProcess, expected: int) -> list[tuple[str, float]]:
    """The plugin's stream fed 20 ms frames of 16-bit audio, as a LiveKit track delivers them.

    The plugin sends no end-of-stream marker (it streams until closed), so the end is seen on
    the server: with this the only session, one model step is one frame of its audio.
    """
    before = steps_run(server)
    got: list[tuple[str, float]] = []
    async with aiohttp.ClientSession() as session:
        stt = kyutai.STT(api_key=KEY, http_session=session, base_url=server.url)
        stream = stt.stream()

        async def read() -> None:
            async for event in stream:
                if event.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
                    word = event.alternatives[0]
                    got.append((word.text, word.start_time))

        reader = asyncio.ensure_future(read())
        pcm16 = np.round(SIGNAL * 32768).clip(-32768, 32767).astype(np.int16)
        step = SAMPLE_RATE // 50
        for i in range(0, pcm16.size, step):
            chunk = pcm16[i : i + step]
            stream.push_frame(rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, chunk.size))
            await asyncio.sleep(0)
        stream.flush()
        frames = pcm16.size // FRAME
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        while steps_run(server) - before < frames or len(got) < expected:
            if loop.time() > deadline:
                break  # the comparison below shows what is missing
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # a word past the expected ones would show up here
        await stream.aclose()
        reader.cancel()
    return got


def test_livekit_kyutai_plugin_reports_our_clients_words(server: ServerProcess) -> None:
    expected = asyncio.run(our_words(server.url))
    assert len(expected) >= 10 and len({text for text, _ in expected}) >= 4  # words that vary
    assert expected == sorted(expected, key=lambda w: w[1])
    wait_for_free_slots(server)
    got = asyncio.run(plugin_words(server, len(expected)))
    assert got == expected  # same texts, same start times, same order; the key was accepted
    wait_for_free_slots(server)  # closing the plugin's stream frees its slot
