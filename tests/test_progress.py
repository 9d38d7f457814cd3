"""The progress of a batch: percentage, elapsed, ETA, speed as N.Nx real time, per file and in
all, on a fake clock."""

from __future__ import annotations

import io

import pytest

from dsm_stt.progress import Progress, clock, speed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_speed_and_clock_read_as_people_expect() -> None:
    assert speed(20.0, 10.0) == "2.0x real time"  # twice as fast as the audio plays
    assert speed(10.6, 78.0) == "0.1x real time"  # 7 times slower than real time
    assert speed(10.6, 120.0) == "0.09x real time"  # never "0.0x"
    assert speed(7.0, 0.0) == "-x real time"
    assert [clock(s) for s in (0, 5.4, 65, 3600 + 62)] == ["0:00", "0:05", "1:05", "1:01:02"]


def test_status_line_per_file_lines_and_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    t = Clock()
    out = io.StringIO()
    p = Progress(["a/one.wav", "b/two.wav"], [10.0, 30.0], out, live=True, clock_fn=t)
    t.now += 5.0
    p.step({0: 4.0, 1: 6.0})  # 10 s of the 40 done in 5 s: 2x real time, 15 s to go
    assert p.status() == (
        "transcribing:  25% of 40.0 s audio, 0:05 elapsed, ETA 0:15, 2.0x real time, "
        "0/2 files (one.wav 40%, two.wav 20%)"
    )
    assert out.getvalue().endswith("\r" + p.status() + "\x1b[K")
    monkeypatch.setenv("COLUMNS", "60")  # a narrow terminal: the line is cut, never wrapped
    t.now += 1.0
    p.step({})
    assert out.getvalue().endswith("\r" + p.status()[:58] + "…\x1b[K")
    monkeypatch.setenv("COLUMNS", "200")
    t.now -= 1.0
    t.now += 5.0
    p.step({0: 9.0, 1: 6.0})  # a file's count stops at its duration (trailing silence)
    p.finish(0, duration=10.0)
    assert "\x1b[Ka/one.wav: 10.0 s of audio in 10.0 s, 1.0x real time\n" in out.getvalue()
    assert p.status().endswith("1/2 files (two.wav 40%)")
    t.now += 10.0
    p.finish(1, error="b/two.wav: read error after 12.00 s of audio")
    assert "dsm-stt: error: b/two.wav: read error after 12.00 s of audio\n" in out.getvalue()
    summary = p.close()
    assert summary == "2 files, 40.0 s of audio in 0:20: 2.0x real time"
    assert out.getvalue().endswith("\r\x1b[K" + summary + "\n")


def test_unknown_durations_and_quiet() -> None:
    t = Clock()
    out = io.StringIO()
    p = Progress(["stream.ogg"], [None], out, live=False, lines=False, clock_fn=t)
    t.now += 2.0
    p.step({0: 3.0})
    assert p.status() == "transcribing: 3.0 s audio, 0:02 elapsed, 1.5x real time"
    p.finish(0, duration=3.5)
    assert p.close() == "1 file, 3.5 s of audio in 0:02: 1.8x real time"
    assert out.getvalue() == ""  # neither live nor lines: nothing at all
    # errors are written whatever the caller chose
    p = Progress(["x.wav"], [1.0], out, live=False, lines=False, clock_fn=t)
    p.finish(0, error="x.wav: bad")
    assert out.getvalue() == "dsm-stt: error: x.wav: bad\n"
