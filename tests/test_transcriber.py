"""Whole-file transcription: batching many files, formats, errors, and the CLI."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from test_scheduler import WORD, F, FakeEngine, audio, decode

from dsm_stt.audio import load_audio
from dsm_stt.cli import main
from dsm_stt.config import EngineConfig
from dsm_stt.engine.engine import Engine
from dsm_stt.engine.scheduler import Scheduler
from dsm_stt.model.checkpoint import load_model
from dsm_stt.transcriber import Split, merge_pieces, plan_cuts, transcribe_files
from dsm_stt.writers import TimedWord


def _write_wav(path: Path, seconds: float, rate: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * rng.uniform(150, 600) * t) * (np.sin(2 * np.pi * 1.3 * t) > 0)
    x += 0.02 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("audio")
    specs = [(1.3, 16000), (2.2, 24000), (0.7, 44100), (1.9, 48000), (1.1, 8000)]
    return [_write_wav(d / f"f{i}.wav", s, r, i) for i, (s, r) in enumerate(specs)]


def _transcribe(
    model, sources, batch_size: int, prefix: float = 0.0, split: Split | None = None, ticks=None
) -> dict[str, object]:
    engine = Engine(model, EngineConfig(batch_size, "cpu"))
    scheduler = Scheduler(engine, model.config.stt.asr_delay_in_tokens, engine.decode)
    out = {}
    on_progress = None if ticks is None else (lambda seconds: ticks.append(seconds))
    for r in transcribe_files(scheduler, sources, model.name, prefix, on_progress, split):
        out[r.source] = r.transcript if r.error is None else r.error
    return out


def test_many_files_on_few_slots_equal_each_alone(tiny_checkpoint: Path, files: list[Path]) -> None:
    model = load_model(tiny_checkpoint)
    together = _transcribe(model, files, batch_size=2)
    assert set(together) == {str(f) for f in files}
    for f in files:
        alone = _transcribe(model, [f], batch_size=1)[str(f)]
        assert together[str(f)] == alone
    durations = [together[str(f)].duration for f in files]
    assert durations == pytest.approx([1.3, 2.2, 0.7, 1.9, 1.1], abs=0.01)
    assert any(t.words for t in together.values())


def test_prefix_is_subtracted_from_timestamps(tiny_checkpoint: Path, files: list[Path]) -> None:
    model = load_model(tiny_checkpoint)
    t = _transcribe(model, [files[1]], batch_size=1, prefix=1.0)[str(files[1])]
    assert t.duration == pytest.approx(2.2, abs=0.01)
    assert all(w.start >= 0 for w in t.words)
    assert all(w.end is None or w.end <= t.duration + 1e-6 for w in t.words)


def test_garbage_file_is_an_error_and_others_finish(
    tiny_checkpoint: Path, files: list[Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"this is not audio" * 100)
    model = load_model(tiny_checkpoint)
    out = _transcribe(model, [files[0], bad, files[2]], batch_size=2)
    assert isinstance(out[str(bad)], str) and "bad.mp3" in out[str(bad)]
    assert not isinstance(out[str(files[0])], str)
    assert not isinstance(out[str(files[2])], str)


def test_cli_formats_output_dir_and_exit_code(
    tiny_checkpoint: Path, files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(
        [
            "transcribe",
            "--model",
            str(tiny_checkpoint),
            "--format",
            "json",
            "--quiet",
            "--batch-size",
            "3",
            *map(str, files[:2]),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == {"text", "words", "duration", "model"}
        for w in obj["words"]:
            assert set(w) == {"text", "start", "end"}
    out_dir = tmp_path / "subs"
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....garbage")
    rc = main(
        [
            "transcribe",
            "--model",
            str(tiny_checkpoint),
            "--format",
            "srt",
            "--quiet",
            "--output-dir",
            str(out_dir),
            str(files[0]),
            str(bad),
            str(files[3]),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "broken.wav" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["f0.srt", "f3.srt"]
    vtt = main(
        ["transcribe", "--model", str(tiny_checkpoint), "--format", "vtt", "--quiet", str(files[0])]
    )
    assert vtt == 0 and capsys.readouterr().out.startswith("WEBVTT")


def test_cli_bad_model_is_a_clear_error(
    tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture
) -> None:
    rc = main(["transcribe", "--model", str(tmp_path / "nope"), str(files[0])])
    assert rc == 2
    assert "model directory not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# --split: one file's pieces side by side


def _write_pcm_wav(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24000)
        w.writeframes((np.round(pcm * 32768)).astype("<i2").tobytes())
    return path


def test_cuts_sit_at_quiet_frames_on_the_frame_grid() -> None:
    rng = np.random.default_rng(0)
    pcm = (0.3 * rng.standard_normal(24000 * 10)).astype(np.float32)
    for gap in ((3.0, 3.4), (6.9, 7.3)):  # near the nominal cuts at 3.33 s and 6.67 s
        pcm[int(gap[0] * 24000) : int(gap[1] * 24000)] = 0.0
    cuts = plan_cuts(pcm, Split(3.4, search=1.0), frame=1920)
    assert cuts[0] == 0 and cuts[-1] == pcm.size and len(cuts) == 4
    for c, (lo, hi) in zip(cuts[1:-1], ((3.0, 3.4), (6.9, 7.3)), strict=True):
        assert c % 1920 == 0 and lo * 24000 <= c - 1920 and c + 1920 <= hi * 24000
    # with no room to move, a cut stays at its nominal frame
    assert plan_cuts(pcm, Split(3.4, search=0.0), frame=1920)[1:-1] == [
        round(k * 125 / 3) * 1920 for k in (1, 2)
    ]
    assert plan_cuts(pcm, Split(7.0), frame=1920) == [0, pcm.size]  # round(10 / 7) = 1 piece
    assert plan_cuts(pcm[:100], Split(2.5), frame=1920) == [0, 100]
    for bad in ({"seconds": 2.0}, {"seconds": 5.0, "overlap": -1.0}):
        with pytest.raises(ValueError, match="split"):
            Split(**bad)


def test_merge_keeps_each_word_once() -> None:
    a = [TimedWord("one", 0.5, 0.9), TimedWord("two", 3.8, 4.3), TimedWord("late", 4.6, 5.0)]
    b = [
        TimedWord("warm", 3.0, 3.3),  # before the piece's start: its warm-up
        TimedWord("two'", 4.0, 4.3),  # the word kept last, heard again: before its middle
        TimedWord("three", 4.6, 5.1),
        TimedWord("four", 6.0, None),
    ]
    c = [TimedWord("four'", 6.0, 6.4), TimedWord("five", 8.2, 8.6)]
    merged = merge_pieces([(0.0, 4.0, a), (4.0, 7.0, b), (7.0, np.inf, c)])
    assert [w.text for w in merged] == ["one", "two", "three", "four", "five"]
    assert merge_pieces([(0.0, np.inf, a)]) == a


def _fake_transcribe(source: Path, batch_size: int, split: Split | None, ticks: list[float]):
    engine = FakeEngine(batch_size)
    scheduler = Scheduler(engine, 2, decode)  # type: ignore[arg-type]
    results = list(transcribe_files(scheduler, [source], "fake", 0.0, ticks.append, split))
    assert len(results) == 1 and results[0].error is None
    return results[0].transcript


def test_split_file_equals_one_stream_for_a_model_without_context(tmp_path: Path) -> None:
    """The scheduler tests' fake engine reads each frame's token from the frame alone, so a
    file cut at its pauses must give the words of the whole stream, times and all."""
    rng = np.random.default_rng(4)
    script: list[int] = []
    while len(script) < 150:  # 12 s: words of 1-3 pieces, pauses of 2-12 frames
        script += [WORD, *rng.integers(10, 40, rng.integers(1, 4))] + [-3] * rng.integers(2, 13)
    source = _write_pcm_wav(tmp_path / "script.wav", audio(script))
    whole = _fake_transcribe(source, 1, None, [])
    assert len(whole.words) >= 10
    split = Split(4.0, overlap=1.0, tail=1.0, search=0.5)
    cuts = plan_cuts(load_audio(source), split, F)
    assert len(cuts) == 4
    ticks_side_by_side: list[float] = []
    ticks_in_turn: list[float] = []
    for batch_size, ticks in ((3, ticks_side_by_side), (1, ticks_in_turn)):
        got = _fake_transcribe(source, batch_size, split, ticks)
        assert got.duration == whole.duration and got.text == whole.text
        for w, e in zip(got.words, whole.words, strict=True):
            assert w.start == pytest.approx(e.start, abs=1e-3)
            assert (w.end is None and e.end is None) or w.end == pytest.approx(e.end, abs=1e-3)
    assert len(ticks_side_by_side) < 0.5 * len(ticks_in_turn)  # three pieces at once


def test_split_with_the_model(tiny_checkpoint: Path, files: list[Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pcm = (0.3 * rng.standard_normal(24000 * 9)).astype(np.float32)
    source = _write_pcm_wav(tmp_path / "long.wav", pcm)
    model = load_model(tiny_checkpoint)
    split = Split(3.0, overlap=1.0, tail=0.5, search=0.5)
    three = _transcribe(model, [source, files[0]], 3, split=split)
    one = _transcribe(model, [source, files[0]], 1, split=split)
    assert three == one  # the pieces' slots never change their words
    assert three[str(source)].duration == pytest.approx(9.0)
    assert all(0 <= w.start <= 9.0 for w in three[str(source)].words)
    # a piece as long as the file: the file as one stream, word for word
    assert _transcribe(model, [source], 2, split=Split(30.0)) == _transcribe(model, [source], 2)


def test_cli_split(tiny_checkpoint: Path, files: list[Path], capsys: pytest.CaptureFixture) -> None:
    args = ["transcribe", "--model", str(tiny_checkpoint), "--exact", "--quiet", "--format", "json"]
    assert main([*args, "--split", "3", str(files[1])]) == 0
    assert json.loads(capsys.readouterr().out)["duration"] == pytest.approx(2.2, abs=0.01)
    assert main([*args, "--split", "0.5", str(files[1])]) == 2
    assert "--split / --split-overlap: split pieces must be longer than" in capsys.readouterr().err
    assert main([*args, "--split", "5", "--split-overlap", "-1", str(files[1])]) == 2
    assert "must be >= 0" in capsys.readouterr().err
    assert main([*args, "--split-overlap", "2", str(files[1])]) == 2
    assert "--split-overlap needs --split" in capsys.readouterr().err
