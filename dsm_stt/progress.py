"""Progress of a batch of files, as people expect it: how far, how long, how fast.

Owns ``Progress``: one status line on a terminal, redrawn in place (the batch's percentage of
audio done, elapsed time, ETA, speed, files done, and the percentage of each file in its slot),
a line per finished file (its audio, its wall time and its speed) and a closing line for the
batch. Speed is written ``N.Nx real time``: seconds of audio per second of wall time, so 2.0x
is twice as fast as the audio plays and 0.5x half as fast. Whether anything is shown at all is
the caller's choice (``live`` for the redrawn line, ``lines`` for the others): the CLI shows
them on a terminal and stays quiet when stderr is a file or a pipe unless asked.

It knows nothing of models or audio decoding: the caller gives durations (``None`` where a
container does not say) and reports the seconds each engine step consumed, by file.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_REDRAW_SECONDS = 0.1


def speed(audio_seconds: float, wall_seconds: float) -> str:
    """``N.Nx real time`` (two decimals below 0.1x, so a slow machine never reads 0.0x)."""
    if wall_seconds <= 0:
        return "-x real time"
    ratio = audio_seconds / wall_seconds
    return f"{ratio:.2f}x real time" if ratio < 0.1 else f"{ratio:.1f}x real time"


def clock(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``."""
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _File:
    path: str  # as the user gave it
    name: str  # short, for the status line
    duration: float | None
    done: float = 0.0  # seconds of audio consumed (capped at the duration when it is known)
    started: float | None = None
    finished: bool = False


class Progress:
    """The progress of ``names`` (durations in seconds, ``None`` if unknown) on ``out``
    (default: stderr)."""

    def __init__(
        self,
        names: Sequence[str],
        durations: Sequence[float | None],
        out: TextIO | None = None,
        *,
        live: bool = True,
        lines: bool = True,
        what: str = "transcribing",
        clock_fn: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = sys.stderr if out is None else out
        self.live = live
        self.lines = lines
        self.what = what
        self._now = clock_fn
        self.files = [_File(str(n), _short(n), d) for n, d in zip(names, durations, strict=True)]
        self.start = self._last_step = self._now()
        self._drawn = 0.0  # when the status line was last drawn
        self._shown = False  # a status line is on the screen

    # -- what the caller reports --------------------------------------------------------------

    def step(self, by_file: Mapping[int, float]) -> None:
        """The seconds of audio one engine step consumed, by file index."""
        now = self._now()
        for index, seconds in by_file.items():
            f = self.files[index]
            if f.started is None:
                f.started = self._last_step  # the step began before it was reported
            f.done += seconds
            if f.duration is not None:
                f.done = min(f.done, f.duration)
        self._last_step = now
        if self.live and now - self._drawn >= _REDRAW_SECONDS:
            self._draw(now)

    def finish(self, index: int, duration: float | None = None, error: str | None = None) -> None:
        """File ``index`` is done (``duration``: what was decoded; ``error``: why it failed)."""
        now = self._now()
        f = self.files[index]
        f.finished = True
        if duration is not None:
            f.duration = duration
        if f.duration is not None:
            f.done = f.duration
        if error is not None:
            self.write(f"dsm-stt: error: {error}")
        elif self.lines:
            wall = now - (f.started if f.started is not None else self.start)
            self.write(f"{f.path}: {f.done:.1f} s of audio in {wall:.1f} s, {speed(f.done, wall)}")
        if self.live:
            self._draw(now)

    def write(self, line: str) -> None:
        """A line above the status line (which is redrawn under it)."""
        self._clear()
        print(line, file=self.out, flush=True)

    def close(self) -> str:
        """Clear the status line; the batch's closing line (written when ``lines``)."""
        self._clear()
        wall = self._now() - self.start
        audio = sum(f.done for f in self.files)
        n = len(self.files)
        summary = (
            f"{n} file{'s' if n != 1 else ''}, {audio:.1f} s of audio in {clock(wall)}: "
            f"{speed(audio, wall)}"
        )
        if self.lines and n > 1:
            print(summary, file=self.out, flush=True)
        return summary

    # -- the status line ----------------------------------------------------------------------

    def status(self, now: float | None = None) -> str:
        """``transcribing: 45% of 27.0 s audio, 0:05 elapsed, ETA 0:06, 2.4x real time, 2/5
        files (c.wav 80%, d.wav 10%)``; without every duration, no percentage nor ETA."""
        now = self._now() if now is None else now
        elapsed = now - self.start
        done = sum(f.done for f in self.files)
        total = sum(f.duration or 0.0 for f in self.files)
        known = all(f.duration is not None for f in self.files)
        if known:
            percent = 100 * done / total if total else 100.0
            line = f"{self.what}: {percent:3.0f}% of {total:.1f} s audio"
        else:
            line = f"{self.what}: {done:.1f} s audio"
        line += f", {clock(elapsed)} elapsed"
        if known and done > 0 and elapsed > 0:
            line += f", ETA {clock((total - done) * elapsed / done)}"
        if done > 0:
            line += f", {speed(done, elapsed)}"
        if len(self.files) > 1:
            finished = sum(f.finished for f in self.files)
            line += f", {finished}/{len(self.files)} files"
            running = [f for f in self.files if f.started is not None and not f.finished]
            if running:
                line += " (" + ", ".join(_file_status(f) for f in running) + ")"
        return line

    def _draw(self, now: float) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        line = self.status(now)
        if len(line) >= width:
            line = line[: max(width - 2, 10)] + "…"
        self.out.write("\r" + line + "\x1b[K")
        self.out.flush()
        self._drawn = now
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self._shown = False


def _file_status(f: _File) -> str:
    if f.duration:
        return f"{f.name} {100 * f.done / f.duration:.0f}%"
    return f"{f.name} {f.done:.0f} s"


def _short(name: str, width: int = 24) -> str:
    base = Path(name).name
    return base if len(base) <= width else base[: width - 1] + "…"
