"""Transcript output: the ``Transcript`` value and one small writer class per file format.

Owns the formats a finished transcription is delivered in: plain text, JSON, SubRip (SRT) and
WebVTT, including how timed words are grouped into readable subtitle cues. It does not produce
transcripts (the engine does) and it never touches audio or tensors.

Word times follow the engine's meaning (spec §4.3): ``start`` is when the word began and
``end`` is usually the next word's start (moshi's ``EndWord``), so a pause hides inside the
word before it; the last word's ``end`` may be unknown (``None``). The cue writers therefore
use an *effective end* per word::

    bound = end                     if end is known
          = the next word's start   if end is None and a word follows
          = duration                otherwise
    effective end = clamp(bound, start, start + max_word_seconds, next word's start)

With the default ``max_word_seconds = 1.0`` a missing last end becomes ``min(start + 1 s,
duration)``, and a word that "lasts" past a pause stops after a second, which makes the pause
visible to the cue splitter. The JSON writer reports the times (and the words) as given.

Cues keep their limits whatever the words: a word is laid out as *pieces* of at most one line
(its space-separated parts, since a model word can hold several, and a part longer than a line
cut into line-sized pieces), which share the word's span; a word of n pieces may last up to n
times ``max_word_seconds``. So no line is longer than ``max_line_chars`` and no cue has more
than ``max_lines`` lines or lasts longer than ``max_cue_seconds``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

FORMATS = ("text", "json", "srt", "vtt")
EXTENSIONS = {"text": "txt", "json": "json", "srt": "srt", "vtt": "vtt"}

_SENTENCE_END = (".", "?", "!", "…")
_CLAUSE_END = (",", ";", ":", "—", "–")
_CLOSERS = "\"')]}»”’"


class TranscriptError(ValueError):
    """A transcript whose values are impossible (negative or unordered times...)."""


class UnknownFormatError(ValueError):
    """An output format not in ``FORMATS``."""


@dataclass(frozen=True)
class TimedWord:
    """One word: its text and its time span in seconds from the start of the audio."""

    text: str
    start: float
    end: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and self.start >= 0):
            raise TranscriptError(f"word {self.text!r}: start must be >= 0, got {self.start}")
        if self.end is not None and not (math.isfinite(self.end) and self.end >= self.start):
            raise TranscriptError(
                f"word {self.text!r}: end {self.end} must be >= start {self.start}"
            )


@dataclass(frozen=True)
class Transcript:
    """A finished transcription. ``words`` may be given as any sequence; it is kept as a tuple
    and the word starts must not decrease."""

    text: str
    words: tuple[TimedWord, ...]
    duration: float
    model: str

    def __post_init__(self) -> None:
        words = tuple(self.words)
        object.__setattr__(self, "words", words)
        if not (math.isfinite(self.duration) and self.duration >= 0):
            raise TranscriptError(f"duration must be >= 0, got {self.duration}")
        for prev, word in itertools.pairwise(words):
            if word.start < prev.start:
                raise TranscriptError(
                    f"word {word.text!r} starts at {word.start} s, before the previous word "
                    f"{prev.text!r} ({prev.start} s): word starts must not decrease"
                )


@dataclass(frozen=True)
class CueOptions:
    """How words are grouped into subtitle cues (defaults follow common subtitle guidelines)."""

    max_line_chars: int = 42
    max_lines: int = 2
    max_cue_seconds: float = 6.0
    pause_seconds: float = 0.6  # a silence this long between words starts a new cue
    max_word_seconds: float = 1.0  # see the module docstring: effective word ends

    def __post_init__(self) -> None:
        if self.max_line_chars < 1 or self.max_lines < 1:
            raise ValueError("max_line_chars and max_lines must be >= 1")
        if not (self.max_cue_seconds > 0 and self.pause_seconds > 0 and self.max_word_seconds > 0):
            raise ValueError("max_cue_seconds, pause_seconds and max_word_seconds must be > 0")


@dataclass(frozen=True)
class Cue:
    """One subtitle: shown from ``start`` to ``end`` seconds, as ``lines`` of text."""

    start: float
    end: float
    lines: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Cue building
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Word:
    """A unit of layout: a space-free piece of text no longer than a line, with its times."""

    text: str
    start: float
    end: float


def _pieces(text: str, width: int) -> list[str]:
    """``text`` cut into pieces of at most ``width`` characters: its space-separated words,
    and each word longer than a line cut after its last ``-`` or ``/`` within the line (when
    that keeps at least half a line), else at exactly ``width`` characters. Cutting greedily
    means two pieces of one word never fit on one line together, so they are never shown
    with a space between them."""
    pieces = []
    for word in text.split():
        while len(word) > width:
            head = word[:width]
            cut = max(head.rfind("-"), head.rfind("/")) + 1
            cut = cut if cut >= (width + 1) // 2 else width
            pieces.append(word[:cut])
            word = word[cut:]
        pieces.append(word)
    return pieces


def _effective_words(t: Transcript, options: CueOptions) -> list[_Word]:
    """The layout units of ``t``: each word's pieces (``_pieces``) sharing its effective span
    equally. A word of n pieces (a model word can hold several space-separated ones) may last
    up to n times ``max_word_seconds``, and no piece lasts longer than a cue may."""
    words = [w for w in t.words if w.text.strip()]
    per_piece = min(options.max_word_seconds, options.max_cue_seconds)
    out = []
    for i, w in enumerate(words):
        pieces = _pieces(w.text, options.max_line_chars)
        following = words[i + 1].start if i + 1 < len(words) else None
        if w.end is not None:
            bound: float = w.end
        elif following is not None:
            bound = following
        else:
            bound = t.duration
        end = min(bound, w.start + per_piece * len(pieces))
        if following is not None:
            end = min(end, following)
        step = max(end - w.start, 0.0) / len(pieces)
        for k, piece in enumerate(pieces):
            # the last piece ends exactly at the word's end (no rounding drift past it)
            last = w.start + step * (k + 1) if k + 1 < len(pieces) else max(end, w.start)
            out.append(_Word(piece, w.start + step * k, last))
    return out


def _wrap(texts: Sequence[str], options: CueOptions) -> list[str] | None:
    """Lay pieces out in at most ``max_lines`` balanced lines of at most ``max_line_chars``,
    or None if they do not fit. One piece always fits (``_pieces`` keeps them that short)."""
    joined = " ".join(texts)
    if len(joined) <= options.max_line_chars:
        return [joined]
    if options.max_lines < 2 or len(texts) == 1:
        return None
    # Choose the split into two lines that keeps the longer line shortest (balanced lines read
    # better than a full line over a short one); more lines use greedy filling.
    best: tuple[int, list[str]] | None = None
    for k in range(1, len(texts)):
        lines = [" ".join(texts[:k]), " ".join(texts[k:])]
        longest = max(map(len, lines))
        if longest <= options.max_line_chars and (best is None or longest < best[0]):
            best = (longest, lines)
    if best is not None:
        return best[1]
    if options.max_lines == 2:
        return None
    lines: list[str] = []
    for text in texts:
        if lines and len(lines[-1]) + 1 + len(text) <= options.max_line_chars:
            lines[-1] += " " + text
        else:
            lines.append(text)
    fits = all(len(line) <= options.max_line_chars for line in lines)
    return lines if fits and len(lines) <= options.max_lines else None


def _ends_with(text: str, marks: tuple[str, ...]) -> bool:
    return text.rstrip(_CLOSERS).endswith(marks)


def _fits(group: Sequence[_Word], options: CueOptions) -> bool:
    if group[-1].end - group[0].start > options.max_cue_seconds and len(group) > 1:
        return False
    return _wrap([w.text for w in group], options) is not None


def build_cues(t: Transcript, options: CueOptions | None = None) -> list[Cue]:
    """Group the words of ``t`` into subtitle cues.

    A new cue starts after a sentence end (``. ? !``), before a word that follows a pause of
    ``pause_seconds`` or more, and when the next word would break a limit (``max_lines`` lines
    of ``max_line_chars``, ``max_cue_seconds``). In the last case the cue is cut after its last
    clause mark (``, ; :``) in its second half if there is one, else before the word. A cue
    spans its first word's start to its last word's effective end, so cues never overlap and
    their times never decrease.
    """
    options = options or CueOptions()
    groups: list[list[_Word]] = []
    current: list[_Word] = []
    for word in _effective_words(t, options):
        if current:
            last = current[-1]
            if _ends_with(last.text, _SENTENCE_END) or word.start - last.end >= (
                options.pause_seconds
            ):
                groups.append(current)
                current = []
            elif not _fits([*current, word], options):
                cut = _clause_cut(current)
                groups.append(current[:cut])
                current = current[cut:]
                while current and not _fits([*current, word], options):
                    groups.append(current)  # the carried-over tail cannot take the word either
                    current = []
        current.append(word)
    if current:
        groups.append(current)
    cues = []
    for group in groups:
        lines = _wrap([w.text for w in group], options)
        assert lines is not None  # every group was checked by _fits or is a single piece
        cues.append(Cue(group[0].start, group[-1].end, tuple(lines)))
    return cues


def _clause_cut(group: Sequence[_Word]) -> int:
    """Where to cut a full cue: after its last clause mark in the second half, else at its end."""
    total = sum(len(w.text) + 1 for w in group)
    seen = 0
    cut = len(group)
    for i, w in enumerate(group[:-1]):
        seen += len(w.text) + 1
        if seen >= total / 2 and _ends_with(w.text, _CLAUSE_END):
            cut = i + 1
    return cut


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def to_json(t: Transcript) -> dict[str, Any]:
    """The transcript as JSON-ready data; times rounded to the millisecond."""
    return {
        "text": t.text,
        "words": [
            {
                "text": w.text,
                "start": round(w.start, 3),
                "end": None if w.end is None else round(w.end, 3),
            }
            for w in t.words
        ],
        "duration": round(t.duration, 3),
        "model": t.model,
    }


class ResultWriter:
    """Renders a transcript in one format. Subclasses set ``format``/``extension`` and ``render``."""

    format: ClassVar[str]
    extension: ClassVar[str]

    def render(self, t: Transcript) -> str:
        raise NotImplementedError

    def write(self, t: Transcript, file: IO[str] | IO[bytes] | str | os.PathLike[str]) -> None:
        """Write to a path (UTF-8, ``\\n`` line ends) or to an open text or binary stream."""
        text = self.render(t)
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_text(text, encoding="utf-8", newline="\n")
        elif _is_binary(file):
            file.write(text.encode("utf-8"))  # type: ignore[arg-type]
        else:
            file.write(text)  # type: ignore[arg-type]


def _is_binary(stream: IO[Any]) -> bool:
    mode = getattr(stream, "mode", None)
    if isinstance(mode, str):
        return "b" in mode
    return not hasattr(stream, "encoding")  # io.BytesIO has no encoding, io.StringIO has one


class TextWriter(ResultWriter):
    """The transcript text, one trailing newline (nothing at all for an empty transcript)."""

    format = "text"
    extension = "txt"

    def render(self, t: Transcript) -> str:
        text = t.text.strip()
        return text + "\n" if text else ""


class JsonWriter(ResultWriter):
    """``to_json`` as a UTF-8 JSON document."""

    format = "json"
    extension = "json"

    def render(self, t: Transcript) -> str:
        return json.dumps(to_json(t), ensure_ascii=False, indent=2) + "\n"


class SubtitlesWriter(ResultWriter):
    """Shared cue rendering of SRT and WebVTT; they differ in header, numbering and stamps."""

    decimal_marker: ClassVar[str]

    def __init__(self, options: CueOptions | None = None) -> None:
        self.options = options or CueOptions()

    def timestamp(self, seconds: float) -> str:
        ms = _ms(seconds)
        hours, ms = divmod(ms, 3_600_000)
        minutes, ms = divmod(ms, 60_000)
        secs, ms = divmod(ms, 1000)
        return f"{hours:02d}:{minutes:02d}:{secs:02d}{self.decimal_marker}{ms:03d}"

    def cue_text(self, line: str) -> str:
        return line

    def header(self) -> str:
        return ""

    def cue_id(self, index: int) -> str | None:
        return None

    def render(self, t: Transcript) -> str:
        blocks = []
        for i, cue in enumerate(build_cues(t, self.options), start=1):
            timing = f"{self.timestamp(cue.start)} --> {self.timestamp(cue.end)}"
            ident = self.cue_id(i)
            head = [ident, timing] if ident is not None else [timing]
            blocks.append("\n".join([*head, *(self.cue_text(line) for line in cue.lines)]))
        return self.header() + "".join(block + "\n\n" for block in blocks)


class SrtWriter(SubtitlesWriter):
    """SubRip: numbered cues from 1, ``HH:MM:SS,mmm`` stamps."""

    format = "srt"
    extension = "srt"
    decimal_marker = ","

    def cue_id(self, index: int) -> str | None:
        return str(index)


class VttWriter(SubtitlesWriter):
    """WebVTT: ``WEBVTT`` header, ``HH:MM:SS.mmm`` stamps, ``& < >`` escaped in cue text."""

    format = "vtt"
    extension = "vtt"
    decimal_marker = "."

    def header(self) -> str:
        return "WEBVTT\n\n"

    def cue_text(self, line: str) -> str:
        return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_WRITERS: dict[str, type[ResultWriter]] = {
    w.format: w for w in (TextWriter, JsonWriter, SrtWriter, VttWriter)
}


def get_writer(format: str) -> ResultWriter:
    """A writer for one of ``FORMATS`` (subtitle writers with default ``CueOptions``)."""
    try:
        return _WRITERS[format]()
    except KeyError:
        raise UnknownFormatError(
            f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}"
        ) from None


def render(t: Transcript, format: str) -> str:
    """The transcript as a string in ``format``."""
    return get_writer(format).render(t)


def write(
    t: Transcript, format: str, stream_or_path: IO[str] | IO[bytes] | str | os.PathLike[str]
) -> None:
    """Write ``t`` in ``format`` to a path or an open text/binary stream."""
    get_writer(format).write(t, stream_or_path)
