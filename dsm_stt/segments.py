"""Transcript segments: timed words grouped into stretches of speech, cut at ends of turn and
long pauses.

Owns ``segment_words`` (and its options), the grouping behind OpenAI's ``verbose_json``
``segments``: a new segment starts before a word when an end of turn lies between it and
the word before (times the caller passes in, e.g. from the model's VAD heads), when the
silence before it is at least ``pause_seconds``, or when the segment would otherwise last
longer than ``max_seconds`` (Whisper's segments never pass its 30 s window either). It
knows nothing of formats or servers; subtitle cues, which have line limits of their own,
are ``writers.build_cues``.

A word's ``end`` is usually the next word's start (spec §4.3): a pause hides inside the word
before it. Pauses are therefore measured from each word's *effective end*, its end (or the
next word's start, or the audio's end) capped at ``start + max_word_seconds``, as the
subtitle writers do; a segment ends at its last word's effective end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .writers import TimedWord


@dataclass(frozen=True)
class SegmentOptions:
    """Where segments are cut (seconds)."""

    pause_seconds: float = 1.0  # a silence this long between words starts a new segment
    max_seconds: float = 30.0  # a segment never spans more (starts of its first and next word)
    max_word_seconds: float = 1.0  # the longest a word is taken to last (see the docstring)

    def __post_init__(self) -> None:
        for name in ("pause_seconds", "max_seconds", "max_word_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class Segment:
    """Consecutive words, shown from ``start`` to ``end`` seconds."""

    start: float
    end: float
    words: tuple[TimedWord, ...]

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)


def effective_end(
    word: TimedWord, following: TimedWord | None, duration: float, max_word_seconds: float
) -> float:
    """When ``word`` may be taken to stop sounding: its end (else the next word's start,
    else ``duration``), at most ``max_word_seconds`` after its start, never before it."""
    if word.end is not None:
        bound = word.end
    elif following is not None:
        bound = following.start
    else:
        bound = duration
    return max(word.start, min(bound, word.start + max_word_seconds))


def segment_words(
    words: Sequence[TimedWord],
    duration: float,
    turn_ends: Sequence[float] = (),
    options: SegmentOptions | None = None,
) -> list[Segment]:
    """Group ``words`` (starts not decreasing) into segments; ``turn_ends``: times (seconds,
    any order) at which a speaker's turn ended. A turn end at ``t`` cuts before the first
    word that starts at or after ``t``, if a word started before it."""
    options = options or SegmentOptions()
    ends = sorted(turn_ends)
    segments: list[Segment] = []
    current: list[TimedWord] = []
    turn = 0  # the first turn end not yet passed

    def close(following: TimedWord | None) -> None:
        last = current[-1]
        end = effective_end(last, following, duration, options.max_word_seconds)
        segments.append(Segment(current[0].start, end, tuple(current)))
        current.clear()

    for i, word in enumerate(words):
        if current:
            last = current[-1]
            pause = word.start - effective_end(last, word, duration, options.max_word_seconds)
            crossed = turn < len(ends) and ends[turn] <= word.start
            if (
                crossed
                or pause >= options.pause_seconds
                or word.start - current[0].start > options.max_seconds
            ):
                close(word)
        while turn < len(ends) and ends[turn] <= word.start:
            turn += 1  # turn ends before the first word, or between two words, are used up
        current.append(word)
        if i + 1 == len(words):
            close(None)
    return segments
