"""Segments from timed words: cuts at long pauses (measured from effective word ends), at
ends of turn, and past the longest span; every word in exactly one segment, in order."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsm_stt.segments import SegmentOptions, effective_end, segment_words
from dsm_stt.writers import TimedWord


def W(text: str, start: float, end: float | None = None) -> TimedWord:
    return TimedWord(text, start, end)


def texts(segments: list) -> list[str]:
    return [s.text for s in segments]


def test_a_pause_hidden_in_a_word_end_still_cuts() -> None:
    # "b" ends when "c" starts (moshi's EndWord), 4 s later: it is taken to last 1 s at most
    words = [W("a", 0.0, 0.4), W("b", 0.4, 4.4), W("c", 4.4, 4.8), W("d", 4.8)]
    segments = segment_words(words, duration=6.0)
    assert texts(segments) == ["a b", "c d"]
    assert (segments[0].start, segments[0].end) == (0.0, 1.4)
    assert (segments[1].start, segments[1].end) == (4.4, 5.8)  # "d": start + 1 s, not 6.0


def test_pauses_shorter_than_the_threshold_do_not_cut() -> None:
    words = [W("a", 0.0, 0.5), W("b", 1.4, 1.6), W("c", 2.5, 2.8)]
    assert texts(segment_words(words, 3.0)) == ["a b c"]
    assert texts(segment_words(words, 3.0, options=SegmentOptions(pause_seconds=0.5))) == [
        "a",
        "b",
        "c",
    ]


def test_ends_of_turn_cut_before_the_next_word() -> None:
    words = [W("a", 0.0, 0.2), W("b", 0.2, 0.4), W("c", 0.4, 0.6), W("d", 0.6, 0.8)]
    # a turn end at 0.3 lies between "b" (0.2) and "c" (0.4); one at a word's start cuts there
    assert texts(segment_words(words, 1.0, turn_ends=[0.6, 0.3])) == ["a b", "c", "d"]
    # turn ends before the first word or after the last change nothing
    assert texts(segment_words(words, 1.0, turn_ends=[0.0, 5.0])) == ["a b c d"]
    # two turn ends between the same two words cut once
    assert texts(segment_words(words, 1.0, turn_ends=[0.25, 0.3, 0.35])) == ["a b", "c d"]


def test_a_segment_never_spans_more_than_max_seconds() -> None:
    words = [W(str(i), i * 0.5, i * 0.5 + 0.5) for i in range(100)]  # 50 s without a pause
    segments = segment_words(words, 50.0, options=SegmentOptions(max_seconds=10.0))
    assert len(segments) == 5
    assert all(s.words[-1].start - s.words[0].start <= 10.0 for s in segments)


def test_no_words_no_segments_and_options_are_checked() -> None:
    assert segment_words([], 10.0, turn_ends=[1.0]) == []
    with pytest.raises(ValueError, match="pause_seconds"):
        SegmentOptions(pause_seconds=0)
    assert effective_end(W("a", 2.0), None, duration=2.5, max_word_seconds=1.0) == 2.5
    assert effective_end(W("a", 2.0), W("b", 2.2), duration=9.0, max_word_seconds=1.0) == 2.2


@given(
    st.lists(st.tuples(st.floats(0, 5), st.one_of(st.none(), st.floats(0, 3))), max_size=40),
    st.lists(st.floats(0, 100), max_size=5),
)
def test_every_word_is_in_one_segment_in_order(
    steps: list[tuple[float, float | None]], turn_ends: list[float]
) -> None:
    words, t = [], 0.0
    for i, (gap, length) in enumerate(steps):
        t += gap
        words.append(W(f"w{i}", t, None if length is None else t + length))
    duration = t + 1.0
    segments = segment_words(words, duration, turn_ends)
    assert [w for s in segments for w in s.words] == words
    for seg, following in itertools.pairwise(segments):
        assert seg.start <= seg.end <= duration
        assert seg.end <= following.words[0].start + 1.0  # an effective end, at most
    for seg in segments:
        assert seg.start == seg.words[0].start and seg.end >= seg.words[-1].start
