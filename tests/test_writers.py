"""Tests for dsm_stt.writers: the JSON schema, text output, and SRT/WebVTT cues parsed back.

The subtitle files are read back with the small parsers below and checked against the rules a
player and a reader need: numbering, timestamp syntax, ordering, no overlap, line and duration
limits, every word present once in order.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_stt.writers import (
    EXTENSIONS,
    FORMATS,
    CueOptions,
    SrtWriter,
    TimedWord,
    Transcript,
    TranscriptError,
    UnknownFormatError,
    VttWriter,
    build_cues,
    get_writer,
    render,
    to_json,
    write,
)

LIMITS = CueOptions()


@dataclass
class ParsedCue:
    start: float
    end: float
    lines: list[str]


def _seconds(stamp: str, marker: str) -> float:
    m = re.fullmatch(rf"(\d{{2}}):([0-5]\d):([0-5]\d){re.escape(marker)}(\d{{3}})", stamp)
    assert m, f"bad timestamp {stamp!r}"
    h, mi, s, ms = map(int, m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def parse_srt(text: str) -> list[ParsedCue]:
    if text == "":
        return []
    assert text.endswith("\n\n") and "\n\n\n" not in text
    cues = []
    for number, block in enumerate(text[:-2].split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), "cues are numbered from 1 without gaps"
        start, arrow, end = lines[1].split(" ")
        assert arrow == "-->"
        assert len(lines) >= 3 and all(lines[2:])
        cues.append(ParsedCue(_seconds(start, ","), _seconds(end, ","), lines[2:]))
    return cues


def parse_vtt(text: str) -> list[ParsedCue]:
    assert text.startswith("WEBVTT\n\n")
    body = text[len("WEBVTT\n\n") :]
    if body == "":
        return []
    assert body.endswith("\n\n") and "\n\n\n" not in body
    cues = []
    for block in body[:-2].split("\n\n"):
        lines = block.split("\n")
        start, arrow, end = lines[0].split(" ")
        assert arrow == "-->"
        assert all("<" not in line and "-->" not in line for line in lines[1:])
        text_lines = [
            line.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
            for line in lines[1:]
        ]
        cues.append(ParsedCue(_seconds(start, "."), _seconds(end, "."), text_lines))
    return cues


def check_cues(cues: list[ParsedCue], t: Transcript, options: CueOptions = LIMITS) -> None:
    """The invariants every subtitle file must satisfy, whatever the words: at most
    ``max_lines`` lines of at most ``max_line_chars`` characters, at most ``max_cue_seconds``,
    no overlap, and every word present once, in order (a word longer than a line as
    consecutive pieces, each on a line of its own or at a line's end / start)."""
    expected = [part for w in t.words for part in w.text.split()]
    pieces = [p for c in cues for line in c.lines for p in line.split(" ")]
    done, partial = 0, ""
    for piece in pieces:
        partial += piece
        assert done < len(expected) and expected[done].startswith(partial), (piece, partial)
        if partial == expected[done]:
            done, partial = done + 1, ""
    assert (done, partial) == (len(expected), ""), "every word, in order, nothing more"
    for cue in cues:
        assert cue.start <= cue.end
        assert cue.end - cue.start <= options.max_cue_seconds + 1e-3
        assert 1 <= len(cue.lines) <= options.max_lines
        for line in cue.lines:
            assert line == line.strip() and "  " not in line and line
            assert len(line) <= options.max_line_chars, line
    for a, b in itertools.pairwise(cues):
        assert a.start <= b.start and a.end <= b.start, "cues must not overlap"
    if cues:
        assert cues[0].start >= t.words[0].start - 1e-3
        assert cues[-1].end <= max(t.duration, max(w.end or 0.0 for w in t.words)) + 1e-3


def words_at(texts: str, step: float = 0.4, start: float = 0.0) -> list[TimedWord]:
    """Contiguous engine-style words: each ends where the next starts; the last end unknown."""
    pieces = texts.split()
    starts = [start + i * step for i in range(len(pieces))]
    return [
        TimedWord(p, s, starts[i + 1] if i + 1 < len(pieces) else None)
        for i, (p, s) in enumerate(zip(pieces, starts, strict=True))
    ]


def transcript(words: list[TimedWord], duration: float | None = None) -> Transcript:
    duration = duration if duration is not None else (words[-1].start + 2 if words else 0.0)
    return Transcript(" ".join(w.text for w in words), words, duration, "kyutai/stt-test")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def test_invalid_transcripts_are_rejected_with_clear_messages() -> None:
    with pytest.raises(TranscriptError, match="start must be >= 0"):
        TimedWord("a", -0.1, 0.2)
    with pytest.raises(TranscriptError, match=r"end 0.5 must be >= start 1.0"):
        TimedWord("a", 1.0, 0.5)
    with pytest.raises(TranscriptError, match="start must be"):
        TimedWord("a", float("nan"))
    with pytest.raises(TranscriptError, match="'b' starts at 1.0 s, before .*'a'"):
        Transcript("a b", [TimedWord("a", 2.0), TimedWord("b", 1.0)], 3.0, "m")
    with pytest.raises(TranscriptError, match="duration"):
        Transcript("", [], -1.0, "m")
    t = Transcript("a", [TimedWord("a", 0.0, 0.5)], 1.0, "m")
    assert isinstance(t.words, tuple) and t == Transcript(
        "a", (TimedWord("a", 0.0, 0.5),), 1.0, "m"
    )


def test_json_schema_exact() -> None:
    t = Transcript(
        "Hello, wörld!",
        [TimedWord("Hello,", 0.12345, 0.6666), TimedWord("wörld!", 0.6666, None)],
        1.23456,
        "kyutai/stt-1b-en_fr",
    )
    assert to_json(t) == {
        "text": "Hello, wörld!",
        "words": [
            {"text": "Hello,", "start": 0.123, "end": 0.667},
            {"text": "wörld!", "start": 0.667, "end": None},
        ],
        "duration": 1.235,
        "model": "kyutai/stt-1b-en_fr",
    }
    rendered = render(t, "json")
    assert json.loads(rendered) == to_json(t)
    assert "wörld" in rendered and '"end": null' in rendered


def test_text_writer() -> None:
    t = transcript(words_at("Hello there."))
    assert render(t, "text") == "Hello there.\n"
    assert render(transcript([]), "text") == ""


# --------------------------------------------------------------------------------------------
# Cues
# --------------------------------------------------------------------------------------------


def test_sentences_start_new_cues_and_times_follow_the_words() -> None:
    t = transcript(words_at("Hello there. How are you? Fine!"), duration=10.0)
    cues = parse_srt(render(t, "srt"))
    assert [c.lines for c in cues] == [["Hello there."], ["How are you?"], ["Fine!"]]
    assert [(c.start, c.end) for c in cues] == [(0.0, 0.8), (0.8, 2.0), (2.0, 3.0)]
    check_cues(cues, t)


def test_missing_last_end_uses_one_second_capped_by_duration() -> None:
    words = [TimedWord("one", 0.0, 0.5), TimedWord("two", 0.5, None)]
    assert build_cues(transcript(words, duration=5.0))[-1].end == 1.5
    assert build_cues(transcript(words, duration=0.9))[-1].end == 0.9
    # A middle word without an end stops at the next word at the latest.
    words = [TimedWord("one", 0.0, None), TimedWord("two", 0.3, 0.7)]
    assert build_cues(transcript(words))[0].end == 0.7


def test_pauses_split_cues_even_when_ends_are_next_starts() -> None:
    # Engine-style ends (the next word's start) hide the 3 s pause after "ready"; the word is
    # capped at max_word_seconds, which reveals the pause and ends the cue one second in.
    words = [
        TimedWord("Are", 0.0, 0.3),
        TimedWord("you", 0.3, 0.6),
        TimedWord("ready", 0.6, 4.0),
        TimedWord("go", 4.0, None),
    ]
    cues = build_cues(transcript(words, duration=4.5))
    assert [c.lines for c in cues] == [("Are you ready",), ("go",)]
    assert (cues[0].start, cues[0].end) == (0.0, 1.6)
    assert (cues[1].start, cues[1].end) == (4.0, 4.5)


def test_limits_break_long_speech_preferring_clause_marks() -> None:
    text = (
        "this is a rather long stretch of speech without any full stop in it, "
        "which keeps going and going so that the writer must break it somewhere sensible"
    )
    t = transcript(words_at(text, step=0.25))
    cues = build_cues(t)
    check_cues(parse_srt(SrtWriter().render(t)), t)
    assert len(cues) >= 2
    assert cues[0].lines[-1].endswith("in it,")  # the comma, not the 84-character limit
    assert all(len(c.lines) <= 2 for c in cues)


def test_cue_duration_limit() -> None:
    t = transcript(words_at(" ".join(["la"] * 40), step=0.5))  # slow: 20 s, short lines
    cues = build_cues(t)
    assert all(c.end - c.start <= 6.0 for c in cues) and len(cues) >= 4
    check_cues(parse_vtt(render(t, "vtt")), t)
    short = CueOptions(max_cue_seconds=2.0)
    assert all(c.end - c.start <= 2.0 for c in build_cues(t, short))


def test_a_word_longer_than_a_line_is_cut_into_line_sized_pieces() -> None:
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis-and-then-some"  # 59 characters
    t = transcript(words_at(f"He said {long_word} twice"))
    cues = build_cues(t)
    # no hyphen within the first 42 characters: cut at 42; the rest (17) goes on with "twice"
    assert [c.lines for c in cues] == [
        ("He said", long_word[:42]),
        (long_word[42:] + " twice",),
    ]
    # the word's two pieces share its span (0.8 s to the next word's start, 1.2 s)
    assert (cues[0].end, cues[1].start) == (pytest.approx(1.0), pytest.approx(1.0))
    check_cues(parse_srt(render(t, "srt")), t)


def test_long_words_are_cut_after_a_hyphen_or_slash_when_one_is_past_half_a_line() -> None:
    word = "state-of-the-art-speech-recognition-for-everyone-everywhere"
    (cue,) = build_cues(transcript([TimedWord(word, 0.0, 2.0)]))
    assert cue.lines == ("state-of-the-art-speech-recognition-for-", "everyone-everywhere")
    url = "https://example.com/a/very/long/path/to/some/page.html"
    (cue,) = build_cues(transcript([TimedWord(url, 0.0, 2.0)]))
    assert cue.lines == ("https://example.com/a/very/long/path/to/", "some/page.html")
    # a hyphen early in the word would make a short line: cut at the line length instead
    word = "a-" + "b" * 60
    (cue,) = build_cues(transcript([TimedWord(word, 0.0, 2.0)]))
    assert cue.lines == (word[:42], word[42:])


def test_a_200_character_word_keeps_every_limit() -> None:
    word = "x" * 200
    t = transcript([TimedWord("Then", 0.0, 0.4), TimedWord(word, 0.4, 3.0), TimedWord("end.", 3.0)])
    cues = build_cues(t)
    assert [line for c in cues for line in c.lines] == [
        "Then",
        "x" * 42,
        "x" * 42,
        "x" * 42,
        "x" * 42,
        "x" * 32 + " end.",
    ]
    assert max(len(c.lines) for c in cues) == 2
    check_cues(parse_srt(render(t, "srt")), t)
    check_cues(parse_vtt(render(t, "vtt")), t)


def test_a_model_word_of_128_space_separated_pieces_is_laid_out_as_128_words() -> None:
    # what a random-weight model gives: no word boundary token for 128 pieces, so one Word
    # whose text holds 128 space-separated parts (the JSON keeps it as the model gave it)
    text = " ".join(f"pi{i}ece" for i in range(128))
    t = transcript([TimedWord(text, 1.0, 3.56), TimedWord("after", 3.56)], duration=5.0)
    assert len(to_json(t)["words"]) == 2
    cues = build_cues(t)
    check_cues(parse_srt(render(t, "srt")), t)
    assert len(cues) > 10 and all(len(line) <= 42 for c in cues for line in c.lines)
    # the word's pieces share its 2.56 s: the cues cover it in order, one after the other
    assert cues[0].start == 1.0 and cues[0].end < 1.5
    assert cues[-1].lines == ("pi125ece pi126ece pi127ece after",)
    assert cues[-1].end == pytest.approx(4.56)  # "after": 3.56 s + 1 s (no end given)


def test_many_tiny_words_zero_durations_and_empty_words() -> None:
    tiny = [TimedWord("a", i * 0.01, i * 0.01) for i in range(1000)]  # 10 s of zero-length words
    t = transcript(tiny, duration=10.0)
    cues = build_cues(t)
    check_cues(parse_srt(render(t, "srt")), t)
    assert sum(len(line.split()) for c in cues for line in c.lines) == 1000
    # every word at the same instant, no durations at all
    same = [TimedWord(w, 2.0, 2.0) for w in ["", "one", " ", "two.", "\t\n", "three"]]
    t = transcript(same, duration=2.0)
    cues = build_cues(t)
    assert [c.lines for c in cues] == [("one two.",), ("three",)]
    assert all(c.start == c.end == 2.0 for c in cues)
    check_cues(parse_vtt(render(t, "vtt")), t)
    only_empty = transcript([TimedWord("", 0.0, 0.0), TimedWord(" \n ", 0.0, None)])
    assert build_cues(only_empty) == [] and render(only_empty, "srt") == ""


def test_one_character_lines_and_single_line_cues() -> None:
    narrow = CueOptions(max_line_chars=1, max_lines=1)
    t = transcript(words_at("ab c def"))
    cues = build_cues(t, narrow)
    assert [c.lines for c in cues] == [("a",), ("b",), ("c",), ("d",), ("e",), ("f",)]
    check_cues(parse_srt(SrtWriter(narrow).render(t)), t, narrow)


def test_two_balanced_lines() -> None:
    t = transcript(words_at("one two three four five six seven eight nine ten eleven twelve"))
    (cue,) = build_cues(t)
    # 33 + 28 characters: the split whose longer line is shortest (27 + 34 is the other near one)
    assert cue.lines == ("one two three four five six seven", "eight nine ten eleven twelve")


def test_timestamp_formats_and_escaping() -> None:
    assert SrtWriter().timestamp(3661.5) == "01:01:01,500"
    assert VttWriter().timestamp(3661.5) == "01:01:01.500"
    assert SrtWriter().timestamp(59.9996) == "00:01:00,000"
    assert VttWriter().timestamp(0.0) == "00:00:00.000"
    t = transcript([TimedWord("<b>R&D", 0.0, 0.5), TimedWord("-->", 0.5, None)])
    vtt = render(t, "vtt")
    assert "&lt;b&gt;R&amp;D --&gt;" in vtt
    assert parse_vtt(vtt)[0].lines == ["<b>R&D -->"]
    assert "<b>R&D -->" in render(t, "srt")


def test_empty_transcripts_are_valid_empty_files() -> None:
    empty = transcript([])
    assert render(empty, "srt") == ""
    assert render(empty, "vtt") == "WEBVTT\n\n"
    assert parse_srt(render(empty, "srt")) == [] and parse_vtt(render(empty, "vtt")) == []
    assert json.loads(render(empty, "json"))["words"] == []
    blank = transcript([TimedWord("", 0.0, 0.2), TimedWord("  ", 0.2, None)], duration=1.0)
    assert render(blank, "srt") == ""


@st.composite
def random_transcripts(draw: st.DrawFn) -> Transcript:
    n = draw(st.integers(0, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzé'-")
    words: list[tuple[str, float]] = []
    t = 0.0
    for _ in range(n):
        length = int(rng.choice([1, 3, 5, 8, 12, 50]))
        mark = str(rng.choice(["", "", "", ",", ".", "?", "!"]))
        t += float(rng.choice([0.0, 0.08, 0.24, 0.4, 0.8, 3.0]))
        words.append(("".join(rng.choice(alphabet, size=length)) + mark, round(t, 3)))
    timed = []
    for i, (text, start) in enumerate(words):
        nxt = words[i + 1][1] if i + 1 < n else None
        end = nxt if nxt is not None and rng.random() < 0.7 else None
        if end is not None and rng.random() < 0.5:  # an acoustic end inside the gap
            end = round(start + (end - start) * float(rng.random()), 3)
        elif rng.random() < 0.1:  # an end past the next start (overlapping words)
            end = round(start + 2 * float(rng.random()), 3)
        timed.append(TimedWord(text, start, end))
    duration = (timed[-1].start + float(rng.random()) * 2) if timed else 0.0
    return Transcript(" ".join(w.text for w in timed), timed, duration, "m")


@settings(max_examples=150, deadline=None)
@given(random_transcripts())
def test_subtitle_invariants_hold_for_random_transcripts(t: Transcript) -> None:
    check_cues(parse_srt(render(t, "srt")), t)
    check_cues(parse_vtt(render(t, "vtt")), t)
    narrow = CueOptions(max_line_chars=16, max_lines=3, max_cue_seconds=2.5)
    check_cues(parse_srt(SrtWriter(narrow).render(t)), t, narrow)


@st.composite
def pathological_transcripts(draw: st.DrawFn) -> Transcript:
    """Words of any text: empty, blank, 250 characters without a space, many parts, any
    unicode and whitespace; zero, tiny and huge gaps; ends missing, zero or past the next."""
    texts = st.one_of(
        st.text(max_size=12),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=40, max_size=250),
        st.lists(st.text("ab-/.,", min_size=1, max_size=9), max_size=130).map(" ".join),
        st.sampled_from(["", " ", "\n", "\t \r", "-->", "a", "x" * 200, "-" * 90]),
    )
    n = draw(st.integers(0, 40))
    start, timed = 0.0, []
    for _ in range(n):
        start += draw(st.sampled_from([0.0, 0.0, 1e-6, 0.01, 0.3, 2.0, 40.0]))
        kind = draw(st.sampled_from(["none", "zero", "short", "long"]))
        end = {"none": None, "zero": start, "short": start + 0.05, "long": start + 9.0}[kind]
        timed.append(TimedWord(draw(texts), start, end))
    duration = start + draw(st.sampled_from([0.0, 0.5, 3.0]))
    return Transcript(" ".join(w.text for w in timed), timed, duration, "m")


@settings(max_examples=300, deadline=None)
@given(
    pathological_transcripts(),
    st.integers(1, 60),
    st.integers(1, 4),
    st.sampled_from([0.5, 2.5, 6.0]),
    st.sampled_from([0.2, 1.0, 8.0]),
)
def test_cue_limits_hold_whatever_the_words(
    t: Transcript, chars: int, lines: int, cue_seconds: float, word_seconds: float
) -> None:
    options = CueOptions(
        max_line_chars=chars,
        max_lines=lines,
        max_cue_seconds=cue_seconds,
        max_word_seconds=word_seconds,
    )
    check_cues(parse_srt(SrtWriter(options).render(t)), t, options)
    check_cues(parse_vtt(VttWriter(options).render(t)), t, options)
    check_cues(parse_srt(render(t, "srt")), t)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_write_to_paths_and_streams(tmp_path: Path) -> None:
    t = transcript(words_at("Bonjour à tous."))
    assert FORMATS == ("text", "json", "srt", "vtt")
    assert [EXTENSIONS[f] for f in FORMATS] == ["txt", "json", "srt", "vtt"]
    for fmt in FORMATS:
        path = tmp_path / f"out.{EXTENSIONS[fmt]}"
        write(t, fmt, path)
        assert path.read_bytes() == render(t, fmt).encode("utf-8")
        text_stream, byte_stream = io.StringIO(), io.BytesIO()
        write(t, fmt, text_stream)
        write(t, fmt, byte_stream)
        assert text_stream.getvalue() == render(t, fmt)
        assert byte_stream.getvalue() == render(t, fmt).encode("utf-8")
        assert get_writer(fmt).extension == EXTENSIONS[fmt]
    with (tmp_path / "opened.srt").open("w", encoding="utf-8") as f:
        write(t, "srt", f)
    assert (tmp_path / "opened.srt").read_text(encoding="utf-8") == render(t, "srt")
    with pytest.raises(UnknownFormatError, match=r"unknown output format 'docx'; choose one of"):
        write(t, "docx", tmp_path / "x.docx")
