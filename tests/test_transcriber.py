"""Whole-file transcription: batching many files, formats, errors, and the CLI."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from dsm_stt.cli import main
from dsm_stt.engine.engine import Engine
from dsm_stt.engine.scheduler import Scheduler
from dsm_stt.model.checkpoint import load_model
from dsm_stt.transcriber import transcribe_files


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


def _transcribe(model, sources, batch_size: int, prefix: float = 0.0) -> dict[str, object]:
    engine = Engine(model, batch_size)
    scheduler = Scheduler(engine, model.config.stt.asr_delay_in_tokens, engine.decode)
    out = {}
    for r in transcribe_files(scheduler, sources, model.name, prefix):
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
