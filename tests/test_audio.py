"""Tests for dsm_stt.audio: file decoding in many formats, streaming Ogg/Opus, padding, frames.

Every file is generated here with PyAV from a known signal (a 440 Hz sine followed by a short
chirp), so the checks are exact about what went in: length, dominant frequency, amplitude,
alignment with the original, and channel averaging.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from dsm_stt.audio import (
    FRAME_SIZE,
    SAMPLE_RATE,
    AudioDecodeError,
    OggOpusStreamDecoder,
    iter_audio,
    load_audio,
    pad_for_stream,
    probe,
    to_frames,
)

SINE_SECONDS = 1.5
CHIRP_SECONDS = 0.25
DURATION = SINE_SECONDS + CHIRP_SECONDS
LAYOUTS = {1: "mono", 2: "stereo"}


def make_signal(rate: int, amplitude: float = 0.5) -> np.ndarray:
    """1.5 s of 440 Hz then a 0.25 s linear chirp 300 Hz → min(2 kHz, 0.4·rate), float64."""
    t = np.arange(round(SINE_SECONDS * rate)) / rate
    sine = np.sin(2 * np.pi * 440 * t)
    f1 = min(2000.0, 0.4 * rate)
    tc = np.arange(round(CHIRP_SECONDS * rate)) / rate
    chirp = np.sin(2 * np.pi * (300 * tc + (f1 - 300) / (2 * CHIRP_SECONDS) * tc**2))
    return amplitude * np.concatenate([sine, chirp])


def encode(
    channels_data: np.ndarray,
    rate: int,
    codec: str,
    container: str,
    *,
    video: bool = False,
    audio: bool = True,
    container_options: dict[str, str] | None = None,
) -> bytes:
    """Encode [C, n] float samples (and optionally a tiny video stream) in memory."""
    buf = io.BytesIO()
    channels = channels_data.shape[0]
    with av.open(buf, "w", format=container, container_options=container_options or {}) as out:
        vstream = None
        if video:
            vstream = out.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 32, 32, "yuv420p"
        astream = None
        if audio:
            astream = out.add_stream(codec, rate=rate, layout=LAYOUTS[channels])
            if codec == "vorbis":  # FFmpeg's own Vorbis encoder is flagged experimental
                astream.codec_context.options = {"strict": "-2"}
        if astream is not None:
            step = 1024
            for i in range(0, channels_data.shape[1], step):
                chunk = np.ascontiguousarray(channels_data[:, i : i + step], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=LAYOUTS[channels])
                frame.sample_rate = rate
                frame.pts = i
                out.mux(astream.encode(frame))
            out.mux(astream.encode(None))
        if vstream is not None:
            for i in range(round(DURATION * 10)):
                img = np.full((32, 32, 3), (i * 9) % 256, dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                frame.pts = i
                out.mux(vstream.encode(frame))
            out.mux(vstream.encode(None))
    return buf.getvalue()


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def sine_part(x: np.ndarray) -> np.ndarray:
    """The steady middle of the sine segment at 24 kHz (away from onsets and codec edges)."""
    return x[round(0.1 * SAMPLE_RATE) : round(1.4 * SAMPLE_RATE)]


def amplitude(x: np.ndarray) -> float:
    return float(np.sqrt(2.0) * np.sqrt(np.mean(x.astype(np.float64) ** 2)))


# name: (codec, container, extension)
CODECS = {
    "mp3": ("libmp3lame", "mp3", "mp3"),
    "wav": ("pcm_s16le", "wav", "wav"),
    "flac": ("flac", "flac", "flac"),
    "vorbis": ("vorbis", "ogg", "ogg"),
    "opus": ("libopus", "ogg", "opus"),
    "aac": ("aac", "ipod", "m4a"),
}
RATES = (8000, 16000, 44100, 48000)
# Lossy codecs pad the end to whole codec frames unless the container says how much to trim.
# MP3 (gapless header), Opus (granule position) and the lossless formats come back exact to
# ±5 ms; AAC in MP4 keeps up to one 1024-sample frame (at the file's rate) of end padding.
EXTRA_SAMPLES = {"aac": 1024}
# LAME writes its output 0.5 dB low (0.95×): PyAV's plain decode of the same file shows it too.
CODEC_GAIN = {"mp3": 0.95}


def _cases() -> list[tuple[str, int, int]]:
    cases = []
    for name in CODECS:
        for rate in RATES:
            for channels in (1, 2):
                if name == "vorbis" and channels == 1:
                    continue  # FFmpeg's native Vorbis encoder only writes stereo
                if name == "opus" and rate == 44100:
                    continue  # Opus has no 44.1 kHz mode (8/12/16/24/48 kHz only)
                cases.append((name, rate, channels))
    return cases


@pytest.mark.parametrize(("name", "rate", "channels"), _cases())
def test_formats_rates_channels(name: str, rate: int, channels: int, tmp_path: Path) -> None:
    codec, container, ext = CODECS[name]
    mono = make_signal(rate, amplitude=1.0)
    # Stereo gets different channels (0.6 and 0.2 of the signal): their mean has amplitude 0.4,
    # where "first channel" would give 0.6 and an FFmpeg-style -3 dB downmix about 0.57.
    data = np.stack([0.5 * mono]) if channels == 1 else np.stack([0.6 * mono, 0.2 * mono])
    expected_amp = (0.5 if channels == 1 else 0.4) * CODEC_GAIN.get(name, 1.0)
    path = tmp_path / f"signal.{ext}"
    path.write_bytes(encode(data, rate, codec, container))

    pcm = load_audio(path)

    assert pcm.dtype == np.float32 and pcm.ndim == 1
    expected_len = DURATION * SAMPLE_RATE
    extra = EXTRA_SAMPLES.get(name, 0) * SAMPLE_RATE / rate
    assert -0.005 * SAMPLE_RATE <= pcm.size - expected_len <= extra + 0.005 * SAMPLE_RATE
    assert abs(dominant_hz(sine_part(pcm), SAMPLE_RATE) - 440) < 2
    assert amplitude(sine_part(pcm)) == pytest.approx(expected_amp, rel=0.03)
    assert np.abs(pcm).max() <= 1.0
    # Aligned with the original (no codec delay left in): strong correlation at lag 0.
    reference = soxr.resample(expected_amp * mono, rate, SAMPLE_RATE).astype(np.float32)
    n = min(reference.size, pcm.size)
    corr = np.corrcoef(reference[:n], pcm[:n])[0, 1]
    assert corr > 0.97, corr


def test_stereo_is_the_mean_of_the_channels_exactly(tmp_path: Path) -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)
    path = tmp_path / "lr.wav"
    path.write_bytes(encode(np.stack([left, right]), SAMPLE_RATE, "pcm_s16le", "wav"))
    pcm = load_audio(path)  # already 24 kHz: no resampling, only int16 rounding
    np.testing.assert_allclose(pcm, (left + right) / 2, atol=1.0 / 32768)


def test_resampling_matches_soxr_high_quality(tmp_path: Path) -> None:
    signal = make_signal(48000)
    path = tmp_path / "f.wav"
    path.write_bytes(encode(signal[None], 48000, "pcm_s16le", "wav"))
    expected = soxr.resample(signal, 48000, SAMPLE_RATE, quality="HQ")
    pcm = load_audio(path)
    assert pcm.size == expected.size == DURATION * SAMPLE_RATE
    np.testing.assert_allclose(pcm, expected, atol=2e-4)
    assert load_audio(path, sample_rate=16000).size == DURATION * 16000


def test_float_input_is_clipped_to_full_scale(tmp_path: Path) -> None:
    loud = make_signal(SAMPLE_RATE, amplitude=1.5)
    path = tmp_path / "loud.wav"
    path.write_bytes(encode(loud[None], SAMPLE_RATE, "pcm_f32le", "wav"))
    pcm = load_audio(path)
    assert pcm.max() == 1.0 and pcm.min() == -1.0
    inside = np.abs(loud) < 1
    np.testing.assert_allclose(pcm[inside], loud[inside], atol=1e-6)


def test_bytes_and_file_objects_decode_like_paths(tmp_path: Path) -> None:
    data = encode(make_signal(16000)[None], 16000, "flac", "flac")
    path = tmp_path / "s.flac"
    path.write_bytes(data)
    from_path = load_audio(path)
    np.testing.assert_array_equal(load_audio(str(path)), from_path)
    np.testing.assert_array_equal(load_audio(data), from_path)
    np.testing.assert_array_equal(load_audio(bytearray(data)), from_path)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), from_path)
    with path.open("rb") as f:
        np.testing.assert_array_equal(load_audio(f), from_path)


def test_iter_audio_streams_chunks_that_add_up_to_load_audio(tmp_path: Path) -> None:
    signal = np.concatenate([make_signal(44100)] * 2)  # 3.5 s
    path = tmp_path / "s.wav"
    path.write_bytes(encode(signal[None], 44100, "pcm_s16le", "wav"))
    chunks = list(iter_audio(path, chunk_seconds=0.5))
    assert len(chunks) >= 6
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert max(c.size for c in chunks[:-1]) < 0.6 * SAMPLE_RATE
    whole = load_audio(path)
    joined = np.concatenate(chunks)
    assert joined.size == whole.size
    np.testing.assert_allclose(joined, whole, atol=1e-5)


@pytest.mark.parametrize(("container", "codec"), [("mp4", "aac"), ("matroska", "libopus")])
def test_audio_track_of_a_video(container: str, codec: str, tmp_path: Path) -> None:
    rate = 48000
    path = tmp_path / ("clip.mp4" if container == "mp4" else "clip.mkv")
    path.write_bytes(encode(make_signal(rate)[None], rate, codec, container, video=True))
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
    pcm = load_audio(path)
    assert abs(pcm.size - DURATION * SAMPLE_RATE) <= 1024 * SAMPLE_RATE / rate + 120
    assert abs(dominant_hz(sine_part(pcm), SAMPLE_RATE) - 440) < 2
    assert amplitude(sine_part(pcm)) == pytest.approx(0.5, rel=0.03)


def test_video_without_audio_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(encode(np.zeros((1, 0)), 48000, "aac", "mp4", video=True, audio=False))
    says = r"video\.mp4: no audio stream \(the file \(MOV\) holds 1 video stream \(mpeg4\)\)$"
    with pytest.raises(AudioDecodeError, match=says):
        load_audio(path)
    with pytest.raises(AudioDecodeError, match=says):
        probe(path)


def test_probe_reads_the_header_and_first_packets(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    path.write_bytes(encode(make_signal(48000)[None], 48000, "libopus", "matroska", video=True))
    info = probe(path)
    assert (info.codec, info.sample_rate, info.channels) == ("opus", 48000, 1)
    assert info.duration == pytest.approx(DURATION, abs=0.1)  # the video may be longer
    wav = tmp_path / "tone.wav"
    wav.write_bytes(encode(make_signal(16000)[None], 16000, "pcm_s16le", "wav"))
    assert probe(wav).duration == pytest.approx(DURATION, abs=1e-3)
    # the errors load_audio gives, without decoding anything
    for bad, says in [
        (tmp_path / "missing.wav", "no such file"),
        (tmp_path, "is a directory"),
        (tmp_path / "empty.wav", "empty file"),
        (tmp_path / "notes.txt", r"notes\.txt: no audio stream \(it is a text file\)"),
    ]:
        if bad.suffix == ".txt":
            bad.write_text("a shopping list, not a recording\n" * 20)
        elif bad.name == "empty.wav":
            bad.write_bytes(b"")
        with pytest.raises(AudioDecodeError, match=says):
            probe(bad)
    # a WAV header over bytes its codec cannot decode
    broken = tmp_path / "broken.wav"
    with wave.open(str(broken), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2000))
    header = broken.read_bytes()[:44]  # format tag 1 (PCM) made 0x55 (MP3)
    broken.write_bytes(header.replace(b"\x01\x00\x01\x00", b"\x55\x00\x01\x00", 1) + b"x" * 4000)
    with pytest.raises(
        AudioDecodeError, match=r"broken\.wav: the mp3\w* audio stream could not be"
    ):
        probe(broken)


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "talk.xyz"
    text.write_text("these are not the samples you are looking for\n" * 50)
    with pytest.raises(AudioDecodeError, match=r"talk\.xyz: not an audio file FFmpeg can read"):
        load_audio(text)
    garbage = np.random.default_rng(0).bytes(20_000)
    with pytest.raises(AudioDecodeError, match=r"<bytes>: not an audio file"):
        load_audio(garbage)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioDecodeError, match=r"empty\.wav: empty file"):
        load_audio(empty)
    with pytest.raises(AudioDecodeError, match=r"empty input"):
        load_audio(b"")
    with pytest.raises(AudioDecodeError, match=r"missing\.mp3: no such file"):
        load_audio(tmp_path / "missing.mp3")
    with pytest.raises(AudioDecodeError, match=r"is a directory"):
        load_audio(tmp_path)
    with pytest.raises(ValueError, match="sample_rate"):
        load_audio(text, sample_rate=0)
    assert issubclass(AudioDecodeError, ValueError)


def test_truncated_file_gives_the_audio_before_the_cut(tmp_path: Path) -> None:
    data = encode(make_signal(44100)[None], 44100, "libmp3lame", "mp3")
    pcm = load_audio(data[: len(data) // 2])
    assert 0.5 * SAMPLE_RATE < pcm.size < 1.2 * SAMPLE_RATE
    assert abs(dominant_hz(sine_part(pcm)[: round(0.5 * SAMPLE_RATE)], SAMPLE_RATE) - 440) < 3


def test_pad_for_stream_and_to_frames() -> None:
    pcm = np.arange(1, 5001, dtype=np.float32)
    padded = pad_for_stream(pcm, 1.0, suffix_seconds=0.5)
    assert padded.dtype == np.float32 and padded.size == SAMPLE_RATE + 5000 + SAMPLE_RATE // 2
    assert not padded[:SAMPLE_RATE].any() and not padded[SAMPLE_RATE + 5000 :].any()
    np.testing.assert_array_equal(padded[SAMPLE_RATE : SAMPLE_RATE + 5000], pcm)
    np.testing.assert_array_equal(pad_for_stream(pcm, 0.0), pcm)
    with pytest.raises(ValueError, match="prefix_seconds"):
        pad_for_stream(pcm, -1.0)
    with pytest.raises(ValueError, match="1-D"):
        pad_for_stream(pcm[None], 1.0)

    frames = to_frames(pcm)
    assert frames.shape == (3, FRAME_SIZE)
    np.testing.assert_array_equal(frames.reshape(-1)[:5000], pcm)
    assert not frames.reshape(-1)[5000:].any()
    assert to_frames(np.zeros(0, np.float32)).shape == (0, FRAME_SIZE)


# --------------------------------------------------------------------------------------------
# OggOpusStreamDecoder
# --------------------------------------------------------------------------------------------


def ogg_opus(channels: int = 1, page_ms: int | None = 20, amp: float = 0.5) -> bytes:
    signal = make_signal(48000, amplitude=amp)
    data = np.stack([signal] * channels)
    options = {"page_duration": str(page_ms * 1000)} if page_ms else None
    return encode(data, 48000, "libopus", "ogg", container_options=options)


def ogg_pages(data: bytes) -> list[bytes]:
    pages, pos = [], 0
    while pos < len(data):
        n_segments = data[pos + 26]
        size = 27 + n_segments + sum(data[pos + 27 : pos + 27 + n_segments])
        pages.append(data[pos : pos + size])
        pos += size
    return pages


def decode_in_pieces(data: bytes, sizes: list[int] | int) -> tuple[np.ndarray, int]:
    decoder = OggOpusStreamDecoder()
    outs, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes if isinstance(sizes, int) else sizes[i % len(sizes)]
        outs.append(decoder.feed(data[pos : pos + size]))
        pos, i = pos + size, i + 1
    outs.append(decoder.close())
    assert all(o.dtype == np.float32 and o.ndim == 1 for o in outs)
    return np.concatenate(outs), sum(o.size > 0 for o in outs[:-1])


@pytest.mark.parametrize("page_ms", [20, None])  # live-style 20 ms pages / FFmpeg's 1 s pages
def test_ogg_opus_stream_any_split_equals_whole(page_ms: int | None) -> None:
    data = ogg_opus(page_ms=page_ms)
    whole, _ = decode_in_pieces(data, len(data))
    assert whole.size == DURATION * SAMPLE_RATE  # pre-skip removed, end padding trimmed
    assert abs(dominant_hz(sine_part(whole), SAMPLE_RATE) - 440) < 2
    assert amplitude(sine_part(whole)) == pytest.approx(0.5, rel=0.03)
    # FFmpeg's own demuxer (load_audio) agrees sample for sample, up to decoder rounding.
    np.testing.assert_allclose(whole, load_audio(data), atol=2e-3)

    rng = np.random.default_rng(1)
    splits: list[list[int] | int] = [1, 7, 4096, rng.integers(1, 300, size=50).tolist()]
    for sizes in splits:
        pieces, _ = decode_in_pieces(data, sizes)
        assert pieces.size == whole.size
        np.testing.assert_allclose(pieces, whole, atol=1e-6)  # soxr chunking: float rounding
    decoder = OggOpusStreamDecoder()
    by_page = [decoder.feed(page) for page in ogg_pages(data)] + [decoder.close()]
    np.testing.assert_allclose(np.concatenate(by_page), whole, atol=1e-6)


def test_ogg_opus_output_arrives_while_feeding() -> None:
    data = ogg_opus(page_ms=20)
    pages = ogg_pages(data)
    decoder = OggOpusStreamDecoder()
    got = sum(decoder.feed(p).size for p in pages[: len(pages) // 2])
    # Half the pages (≈ 0.87 s of audio) give nearly all their samples before close().
    assert got > 0.8 * SAMPLE_RATE
    assert decoder.feed(b"").size == 0


def test_ogg_opus_stereo_and_chained_streams() -> None:
    stereo, _ = decode_in_pieces(ogg_opus(channels=2), 333)
    assert stereo.size == DURATION * SAMPLE_RATE
    assert amplitude(sine_part(stereo)) == pytest.approx(0.5, rel=0.03)

    first, second = ogg_opus(amp=0.5), ogg_opus(amp=0.25)
    chained, _ = decode_in_pieces(first + second, 100)
    assert chained.size == 2 * DURATION * SAMPLE_RATE
    half = round(DURATION * SAMPLE_RATE)
    assert amplitude(sine_part(chained[:half])) == pytest.approx(0.5, rel=0.03)
    assert amplitude(sine_part(chained[half:])) == pytest.approx(0.25, rel=0.03)


def test_ogg_opus_bad_streams_are_clear_errors() -> None:
    with pytest.raises(AudioDecodeError, match="expected an Ogg page at byte 0"):
        OggOpusStreamDecoder().feed(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    data = ogg_opus()
    pages = ogg_pages(data)
    decoder = OggOpusStreamDecoder()
    decoder.feed(b"".join(pages[:3]))
    with pytest.raises(AudioDecodeError, match=f"at byte {sum(map(len, pages[:3]))}"):
        decoder.feed(b"\x00garbage" * 10)
    with pytest.raises(AudioDecodeError, match=r"first page \(byte 0\) does not begin a stream"):
        OggOpusStreamDecoder().feed(b"".join(pages[3:6]))
    vorbis = encode(np.stack([make_signal(48000)] * 2), 48000, "vorbis", "ogg")
    with pytest.raises(AudioDecodeError, match=r"no Opus stream .*found Vorbis"):
        OggOpusStreamDecoder().feed(vorbis)
    closed = OggOpusStreamDecoder()
    closed.close()
    with pytest.raises(AudioDecodeError, match="after close"):
        closed.feed(data)


def test_ogg_opus_truncated_stream_keeps_complete_pages() -> None:
    data = ogg_opus(page_ms=20)
    cut, _ = decode_in_pieces(data[: len(data) // 2 + 5], 512)
    full, _ = decode_in_pieces(data, len(data))
    assert 0.7 * SAMPLE_RATE < cut.size < 1.0 * SAMPLE_RATE
    # The same as the full decode except the last few ms, which soxr flushes early.
    np.testing.assert_allclose(cut[: cut.size - 480], full[: cut.size - 480], atol=1e-6)


def test_pyav_19_open_without_metadata_options(tmp_path: Path, monkeypatch) -> None:
    """PyAV 19 (Python 3.12+) dropped ``metadata_errors``: decoding must not pass it there,
    and must still pass it to older releases (where it keeps bad metadata bytes harmless)."""
    data = encode(make_signal(16000)[None], 16000, "flac", "flac")
    expected = load_audio(data)
    real_open, seen = av.open, []

    def open_19(file, mode="r", **kwargs):
        seen.append(sorted(kwargs))
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        return real_open(file, mode, **kwargs)

    monkeypatch.setattr(av, "open", open_19)
    monkeypatch.setattr(av, "__version__", "19.0.2")
    np.testing.assert_array_equal(load_audio(data), expected)
    monkeypatch.setattr(av, "__version__", "18.1.0")
    with pytest.raises(TypeError, match="metadata_errors"):
        load_audio(data)
    assert seen == [[], ["metadata_errors"]]
