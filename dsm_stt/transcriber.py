"""Whole-file transcription through the streaming scheduler: many files share the batch.

Owns ``transcribe_files``: decode each input progressively (PyAV + soxr, ``audio.py``), prepend
the model's ``audio_silence_prefix_seconds`` (subtracted again from every timestamp, so times
are in file time for both models), keep every slot of the batch busy (a new file takes a slot
as soon as one frees), close each stream (the scheduler pads the trailing silence) and turn its
Word/EndWord events into a ``Transcript``. A file that cannot be decoded yields an error result;
the others go on. The same scheduler and engine serve the WebSocket server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioDecodeError, iter_audio
from .engine.events import Closed, EndWord, Word
from .engine.scheduler import Scheduler
from .writers import TimedWord, Transcript

# Frames of decoded audio kept queued per stream: enough to never starve a tick, small enough
# that hours of audio never sit in memory.
_QUEUE_FRAMES = 64


@dataclass(frozen=True)
class FileResult:
    index: int
    source: str
    transcript: Transcript | None = None
    error: str | None = None


@dataclass
class _Job:
    index: int
    source: str
    chunks: Iterator[np.ndarray]
    samples: int = 0
    exhausted: bool = False
    words: list[list] = field(default_factory=list)  # [text, start, end]
    skip_end: bool = False  # the last Word was empty: its EndWord is dropped too

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

    def transcript(self, model: str) -> Transcript:
        duration = self.samples / SAMPLE_RATE
        words = [
            TimedWord(t, round(s, 3), None if e is None else round(e, 3)) for t, s, e in self.words
        ]
        return Transcript(" ".join(w.text for w in words), words, round(duration, 3), model)


def transcribe_files(
    scheduler: Scheduler,
    sources: Sequence[str | Path],
    model_name: str,
    prefix_seconds: float = 0.0,
    on_progress: Callable[[float], None] | None = None,
) -> Iterator[FileResult]:
    """Transcribe ``sources`` with every slot of ``scheduler`` busy; results as they finish.

    ``on_progress`` receives the seconds of audio consumed by each engine step (all slots).
    """
    frame = scheduler.frame_size
    prefix = np.zeros(round(prefix_seconds * SAMPLE_RATE), dtype=np.float32)
    waiting = list(enumerate(map(str, sources)))[::-1]
    jobs: dict[int, _Job] = {}

    def top_up(job: _Job) -> FileResult | None:
        """Keep ``_QUEUE_FRAMES`` frames queued; close the stream at the end of the file."""
        while not job.exhausted and scheduler.buffered_samples(job.index) < _QUEUE_FRAMES * frame:
            try:
                chunk = next(job.chunks, None)
            except AudioDecodeError as exc:
                scheduler.remove(job.index)
                del jobs[job.index]
                return FileResult(job.index, job.source, error=str(exc))
            if chunk is None:
                job.exhausted = True
                scheduler.close(job.index)
            else:
                job.samples += chunk.size
                scheduler.feed(job.index, chunk)
        return None

    while waiting or jobs:
        while waiting and scheduler.free_slots:
            index, source = waiting.pop()
            job = _Job(index, source, iter_audio(source))
            scheduler.admit(index, time_offset=prefix_seconds)
            jobs[index] = job
            if prefix.size:
                scheduler.feed(index, prefix)
        for job in list(jobs.values()):
            failed = top_up(job)
            if failed is not None:
                yield failed
        if not jobs:
            continue
        active = sum(1 for j in jobs.values() if scheduler.buffered_samples(j.index) >= frame)
        events = scheduler.tick()
        if on_progress is not None:
            on_progress(active * frame / SAMPLE_RATE)
        for index, evs in events.items():
            job = jobs[index]
            for event in evs:
                if isinstance(event, Closed):
                    del jobs[index]
                    yield FileResult(index, job.source, transcript=job.transcript(model_name))
                else:
                    job.on_event(event)
