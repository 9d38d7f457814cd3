"""Whole-file transcription through the streaming scheduler: many files share the batch.

Owns ``transcribe_files``: decode each input progressively (PyAV + soxr, ``audio.py``), prepend
the model's ``audio_silence_prefix_seconds`` (subtracted again from every timestamp, so times
are in file time for both models), keep every slot of the batch busy (a new file takes a slot
as soon as one frees), close each stream (the scheduler pads the trailing silence) and turn its
Word/EndWord events into a ``Transcript``. A file that cannot be decoded yields an error result;
the others go on. The same scheduler and engine serve the WebSocket server.

With a ``Split``, a long file is cut into pieces that run side by side in free slots: each cut
sits at the quietest pair of frames near its nominal place, on the model's frame grid; a piece
starts ``overlap`` seconds before its cut (warm-up whose words are dropped) and goes on
``tail`` seconds past the next one (so that a word begun before the cut is heard to its end);
the pieces' words are joined by their start times (``merge_pieces``).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, AudioDecodeError, iter_audio, load_audio
from .engine.events import Closed, EndWord, Word
from .engine.scheduler import Scheduler
from .writers import TimedWord, Transcript

if TYPE_CHECKING:
    from .engine.engine import Engine

# Frames of decoded audio kept queued per stream: enough to never starve a tick, small enough
# that hours of audio never sit in memory.
_QUEUE_FRAMES = 64


@dataclass(frozen=True)
class FileResult:
    index: int
    source: str
    transcript: Transcript | None = None
    error: str | None = None


@dataclass(frozen=True)
class Split:
    """How ``transcribe_files`` cuts a long file into pieces that run side by side."""

    seconds: float  # about this much of the file per piece
    overlap: float = 5.0  # audio before each cut that the next piece starts with (warm-up)
    tail: float = 2.0  # audio after each cut that the piece before goes on with
    search: float = 1.0  # a cut moves to the quietest frames within this many seconds

    def __post_init__(self) -> None:
        if not self.seconds > 2 * self.search:
            raise ValueError(
                f"split pieces must be longer than {2 * self.search:g} s, got {self.seconds!r}"
            )
        if not (self.overlap >= 0 and self.tail >= 0 and self.search >= 0):
            raise ValueError("split overlap, tail and search must be >= 0")


def plan_cuts(pcm: np.ndarray, split: Split, frame: int) -> list[int]:
    """Sample offsets ``[0, c_1, ..., len(pcm)]`` of a file's pieces: ``round(duration /
    seconds)`` pieces of about equal length, each inner cut a multiple of ``frame`` at the
    quietest two frames within ``search`` seconds of its nominal place."""
    n_frames = pcm.size // frame
    pieces = max(1, round(pcm.size / (split.seconds * SAMPLE_RATE)))
    if pieces == 1 or n_frames < 2:
        return [0, pcm.size]
    energy = np.square(pcm[: n_frames * frame].reshape(n_frames, frame)).mean(axis=1)
    pair = energy[:-1] + energy[1:]  # pair[j - 1]: the frames on both sides of a cut at j
    reach = round(split.search * SAMPLE_RATE / frame)
    cuts = [0]
    for k in range(1, pieces):
        nominal = round(k * n_frames / pieces)
        lo, hi = max(1, nominal - reach), min(n_frames - 1, nominal + reach)
        j = lo + int(np.argmin(pair[lo - 1 : hi]))
        cuts.append(j * frame)
    return [*cuts, pcm.size]


def merge_pieces(pieces: Sequence[tuple[float, float, Sequence[TimedWord]]]) -> list[TimedWord]:
    """Join the words of consecutive pieces, each ``(start, end, words)`` with its words in
    file time: a piece contributes the words that start within ``[start, end)``, except one
    that starts before the middle of the word kept last (the same word heard by both)."""
    kept: list[TimedWord] = []
    for start, end, words in pieces:
        for w in words:
            if not start <= w.start < end:
                continue
            if kept:
                last = kept[-1]
                middle = last.start if last.end is None else (last.start + last.end) / 2
                if w.start < middle:
                    continue
            kept.append(w)
    return kept


@dataclass
class _Job:
    index: int
    source: str
    chunks: Iterator[np.ndarray]
    stream_id: Hashable = None  # the file's index, or (index, piece) for a piece of a file
    samples: int = 0
    exhausted: bool = False
    words: list[list] = field(default_factory=list)  # [text, start, end]
    skip_end: bool = False  # the last Word was empty: its EndWord is dropped too

    def __post_init__(self) -> None:
        if self.stream_id is None:
            self.stream_id = self.index

    def on_event(self, event: object) -> None:
        if isinstance(event, Word):
            text = event.text.strip()
            self.skip_end = not text
            if text:
                self.words.append([text, max(event.start_time, 0.0), None])
        elif isinstance(event, EndWord):
            if not self.skip_end and self.words and self.words[-1][2] is None:
                self.words[-1][2] = max(event.stop_time, self.words[-1][1])
            self.skip_end = False

    def timed_words(self) -> list[TimedWord]:
        return [
            TimedWord(t, round(s, 3), None if e is None else round(e, 3)) for t, s, e in self.words
        ]

    def transcript(self, model: str) -> Transcript:
        return _transcript(self.timed_words(), self.samples, model)


def _transcript(words: list[TimedWord], samples: int, model: str) -> Transcript:
    text = " ".join(w.text for w in words)
    return Transcript(text, words, round(samples / SAMPLE_RATE, 3), model)


@dataclass
class _SplitFile:
    """A file cut into pieces: what is known of it until its last piece closes."""

    index: int
    source: str
    samples: int
    bounds: list[tuple[float, float]]  # each piece's [start, end) in file seconds
    words: dict[int, list[TimedWord]] = field(default_factory=dict)  # by piece, once closed

    def transcript(self, model: str) -> Transcript:
        pieces = [(*self.bounds[k], self.words[k]) for k in range(len(self.bounds))]
        return _transcript(merge_pieces(pieces), self.samples, model)


def scheduler_for(engine: Engine) -> Scheduler:
    """The scheduler that ``transcribe_files`` drives, for ``engine``'s model."""
    cfg = engine.model.config
    return Scheduler(
        engine, cfg.stt.asr_delay_in_tokens, engine.decode, frame_rate=cfg.mimi.frame_rate
    )


def output_paths(sources: Sequence[str | Path], out_dir: Path, extension: str) -> list[Path]:
    """Where each input's transcript goes under ``out_dir``: the inputs' folders are mirrored
    below their common parent (``a/x.wav`` and ``b/x.mp3`` give ``OUT/a/x.EXT`` and
    ``OUT/b/x.EXT``; files of one folder land in ``OUT`` itself). Two inputs that would still
    share a name (``x.wav`` and ``x.mp3`` side by side) are refused with ``ValueError``."""
    resolved = [Path(s).resolve() for s in sources]
    common = Path(os.path.commonpath([p.parent for p in resolved])) if resolved else Path()
    paths: list[Path] = []
    taken: dict[Path, str] = {}
    for source, path in zip(sources, resolved, strict=True):
        out = out_dir / path.parent.relative_to(common) / f"{path.stem}.{extension}"
        if out in taken:
            raise ValueError(
                f"{taken[out]} and {source} would both be written to {out}: rename one, or "
                "transcribe them in two runs with different --output-dir"
            )
        taken[out] = str(source)
        paths.append(out)
    return paths


def _chunks(pcm: np.ndarray, size: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    for start in range(0, pcm.size, size):
        yield pcm[start : start + size]


def transcribe_files(
    scheduler: Scheduler,
    sources: Sequence[str | Path],
    model_name: str,
    prefix_seconds: float = 0.0,
    on_progress: Callable[[float], None] | None = None,
    split: Split | None = None,
    on_step: Callable[[Mapping[int, float]], None] | None = None,
) -> Iterator[FileResult]:
    """Transcribe ``sources`` with every slot of ``scheduler`` busy; results as they finish.

    ``on_progress`` receives the seconds of audio consumed by each engine step (all slots);
    ``on_step`` the same by file (index in ``sources`` → seconds; the silence the model is
    fed before and after a file counts too).
    With ``split``, each file is decoded whole and cut into pieces (module docstring).
    """
    frame = scheduler.frame_size
    prefix = np.zeros(round(prefix_seconds * SAMPLE_RATE), dtype=np.float32)
    waiting = deque(enumerate(map(str, sources)))
    # streams waiting for a slot (a file, or a piece of one) and where they start in it (s)
    ready: deque[tuple[_Job, float]] = deque()
    jobs: dict[Hashable, _Job] = {}
    split_files: dict[int, _SplitFile] = {}

    def cut(index: int, source: str) -> FileResult | None:
        """Decode a file whole and queue its pieces (one piece: the file as one stream)."""
        try:
            pcm = load_audio(source)
        except AudioDecodeError as exc:
            return FileResult(index, source, error=str(exc))
        cuts = plan_cuts(pcm, split, frame)
        if len(cuts) == 2:
            ready.append((_Job(index, source, _chunks(pcm)), 0.0))
            return None
        overlap = round(split.overlap * SAMPLE_RATE / frame) * frame
        tail = round(split.tail * SAMPLE_RATE)
        bounds = []
        for k, (lo, hi) in enumerate(itertools.pairwise(cuts)):
            start = max(0, lo - overlap)
            piece = pcm[start : min(pcm.size, hi + tail)]
            ready.append((_Job(index, source, _chunks(piece), (index, k)), start / SAMPLE_RATE))
            bounds.append((lo / SAMPLE_RATE, hi / SAMPLE_RATE if k < len(cuts) - 2 else np.inf))
        split_files[index] = _SplitFile(index, source, pcm.size, bounds)
        return None

    def top_up(job: _Job) -> FileResult | None:
        """Keep ``_QUEUE_FRAMES`` frames queued; close the stream at the end of the file."""
        key = job.stream_id
        while not job.exhausted and scheduler.buffered_samples(key) < _QUEUE_FRAMES * frame:
            try:
                chunk = next(job.chunks, None)
            except AudioDecodeError as exc:
                scheduler.remove(key)
                del jobs[key]
                return FileResult(job.index, job.source, error=str(exc))
            if chunk is None:
                job.exhausted = True
                scheduler.close(key)
            else:
                job.samples += chunk.size
                scheduler.feed(key, chunk)
        return None

    def finished(job: _Job) -> FileResult | None:
        if job.stream_id == job.index:
            return FileResult(job.index, job.source, transcript=job.transcript(model_name))
        whole = split_files[job.index]
        whole.words[job.stream_id[1]] = job.timed_words()
        if len(whole.words) < len(whole.bounds):
            return None
        del split_files[job.index]
        return FileResult(job.index, job.source, transcript=whole.transcript(model_name))

    while waiting or ready or jobs:
        while (waiting or ready) and scheduler.free_slots:
            if not ready:
                index, source = waiting.popleft()
                if split is None:
                    ready.append((_Job(index, source, iter_audio(source)), 0.0))
                else:
                    failed = cut(index, source)
                    if failed is not None:
                        yield failed
                    continue
            job, start = ready.popleft()
            # timestamps in file time: less the silence prefix, plus where the piece starts
            scheduler.admit(job.stream_id, time_offset=prefix_seconds - start)
            jobs[job.stream_id] = job
            if prefix.size:
                scheduler.feed(job.stream_id, prefix)
        for job in list(jobs.values()):
            failed = top_up(job)
            if failed is not None:
                yield failed
        if not jobs:
            continue
        active = [
            job.index for key, job in jobs.items() if scheduler.buffered_samples(key) >= frame
        ]
        events = scheduler.tick()
        if on_progress is not None:
            on_progress(len(active) * frame / SAMPLE_RATE)
        if on_step is not None:
            by_file: dict[int, float] = {}
            for index in active:
                by_file[index] = by_file.get(index, 0.0) + frame / SAMPLE_RATE
            on_step(by_file)
        for key, evs in events.items():
            job = jobs[key]
            for event in evs:
                if isinstance(event, Closed):
                    del jobs[key]
                    result = finished(job)
                    if result is not None:
                        yield result
                else:
                    job.on_event(event)
