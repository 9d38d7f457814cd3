"""Tests for dsm_stt.engine.turns: the presets' mapping onto the heads, and the detector on
hand-written probability sequences (speech, pause, late words, holds, timeouts)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsm_stt.engine.events import EndWord, Marker, Step, Word
from dsm_stt.engine.turns import (
    HEAD_HORIZONS,
    EndOfTurn,
    SpeechStarted,
    TurnConfig,
    TurnDetector,
)

FR = 12.5
SPEECH = (0.05, 0.1, 0.1, 0.1)  # a word is coming: every pause head low
PAUSE = (0.9, 0.9, 0.9, 0.9)  # a long pause: every head high
SHORT_PAUSE = (0.9, 0.2, 0.2, 0.2)  # only the 0.5 s head foresees a pause


def steps(prs_list: list[tuple[float, ...]], start: int = 0) -> list[Step]:
    return [Step(start + i, prs, 0) for i, prs in enumerate(prs_list)]


def run(detector: TurnDetector, events: list[object]) -> list[tuple[int, object]]:
    """(index of the event that completed it, turn event) for every turn event."""
    out = []
    for i, ev in enumerate(events):
        out.extend((i, t) for t in detector.push(ev))
    return out


# --- the presets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("silence_ms", "head", "hold"),
    [
        (0, 0, 0.0),
        (200, 0, 0.0),
        (500, 0, 0.0),
        (700, 0, 0.2),
        (1000, 1, 0.0),
        (1500, 1, 0.5),
        (2000, 2, 0.0),
        (2500, 2, 0.5),
        (3000, 3, 0.0),
        (5000, 3, 2.0),
    ],
)
def test_server_vad_picks_the_longest_head_that_fits_and_holds_the_rest(
    silence_ms: int, head: int, hold: float
) -> None:
    cfg = TurnConfig.server_vad(
        threshold=0.7, prefix_padding_ms=250, silence_duration_ms=silence_ms
    )
    assert cfg.head == head
    assert cfg.hold == pytest.approx(hold)
    assert cfg.threshold == 0.7 and cfg.prefix_padding == pytest.approx(0.25)
    assert cfg.max_silence is None
    assert HEAD_HORIZONS[cfg.head] + cfg.hold == pytest.approx(max(silence_ms / 1000, 0.5))


def test_server_vad_defaults_are_openais() -> None:
    cfg = TurnConfig.server_vad()
    assert (cfg.head, cfg.threshold, cfg.hold, cfg.prefix_padding) == (0, 0.5, 0.0, 0.3)


@pytest.mark.parametrize(
    ("eagerness", "head", "max_silence"),
    [("high", 1, 2.0), ("medium", 2, 4.0), ("auto", 2, 4.0), ("low", 3, 8.0)],
)
def test_semantic_vad_eagerness_picks_the_horizon(
    eagerness: str, head: int, max_silence: float
) -> None:
    cfg = TurnConfig.semantic_vad(eagerness)
    assert (cfg.head, cfg.threshold, cfg.max_silence, cfg.hold) == (head, 0.5, max_silence, 0.0)
    assert cfg.heads_needed == head + 1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TurnConfig(threshold=1.5), "threshold"),
        (lambda: TurnConfig(head=-1), "head"),
        (lambda: TurnConfig(head=True), "head"),
        (lambda: TurnConfig(hold=-0.1), "hold"),
        (lambda: TurnConfig(max_silence=0.0), "max_silence"),
        (lambda: TurnConfig(prefix_padding=-1.0), "prefix_padding"),
        (lambda: TurnConfig(ignore_steps=-1), "ignore_steps"),
        (lambda: TurnConfig.semantic_vad("eager"), "eagerness"),
        (lambda: TurnConfig.server_vad(silence_duration_ms=-5), "silence_duration_ms"),
        (lambda: TurnConfig.server_vad(prefix_padding_ms=-5), "prefix_padding_ms"),
        (lambda: TurnDetector(TurnConfig(), frame_rate=0), "frame_rate"),
    ],
)
def test_bad_settings_are_refused_by_name(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


# --- the detector -----------------------------------------------------------------------------


def test_a_turn_starts_on_speech_and_ends_on_the_pause_head() -> None:
    cfg = TurnConfig(head=2, threshold=0.5, prefix_padding=0.2, ignore_steps=12)
    detector = TurnDetector(cfg, FR)
    # 15 steps of silence, 10 of speech, 3 of a short pause, 2 of speech, then a long pause
    prs = [PAUSE] * 15 + [SPEECH] * 10 + [SHORT_PAUSE] * 3 + [SPEECH] * 2 + [PAUSE] * 5
    out = run(detector, steps(prs, start=100))
    assert [type(t) for _, t in out] == [SpeechStarted, EndOfTurn]
    (i_start, start), (i_end, end) = out
    # three steps of speech in a row start it, from the first of them
    assert i_start == 17 and start == SpeechStarted(117, pytest.approx(15 / FR - 0.2))
    # only head 2 ends it: the short pause (head 0 high) does not
    assert i_end == 30
    assert end == EndOfTurn(step=130, time=pytest.approx(31 / FR), probability=0.9, head=2)
    assert not detector.speaking


def test_the_first_steps_are_not_trusted() -> None:
    detector = TurnDetector(TurnConfig(ignore_steps=12), FR)
    out = run(detector, steps([SPEECH] * 20))
    assert out == [(14, SpeechStarted(14, pytest.approx(12 / FR)))]  # the 13th to 15th steps


def test_a_flicker_of_speech_starts_nothing() -> None:
    detector = TurnDetector(TurnConfig(ignore_steps=0), FR)
    assert run(detector, steps([PAUSE, SPEECH, SPEECH, PAUSE, SPEECH, PAUSE] * 3)) == []


def test_a_word_starts_a_turn_and_late_words_do_not_start_another() -> None:
    cfg = TurnConfig(head=2, threshold=0.5, ignore_steps=0)
    detector = TurnDetector(cfg, FR)
    events: list[object] = steps([PAUSE] * 5)
    events.append(Word("", 0.1))  # empty words (the model's first) are nothing
    events.append(Word("hello", 0.16))  # the heads missed it, the word did not
    events += steps([PAUSE] * 2, start=5)
    events += [Word("world", 0.4), EndWord(0.5)]  # a late word of the ended turn
    events += steps([PAUSE] * 3, start=7)
    events.append(Word("again", 0.9))  # after the end: a new turn
    events += steps([SPEECH] * 2, start=10)
    out = run(detector, events)
    assert [t for _, t in out] == [
        SpeechStarted(4, pytest.approx(0.16)),
        EndOfTurn(5, pytest.approx(6 / FR), 0.9, 2),
        SpeechStarted(9, pytest.approx(0.9)),
    ]
    assert out[1][0] == 7  # the first step after the word ended it: 0.48 s


def test_the_start_never_reaches_back_before_the_previous_turn() -> None:
    detector = TurnDetector(TurnConfig(head=0, threshold=0.5, prefix_padding=5.0, ignore_steps=0))
    out = run(detector, steps([SPEECH] * 3 + [PAUSE] + [SPEECH] * 3))
    starts = [t for _, t in out if isinstance(t, SpeechStarted)]
    ends = [t for _, t in out if isinstance(t, EndOfTurn)]
    assert starts[0].time == 0.0  # not before the stream's start
    assert starts[1].time == pytest.approx(ends[0].time) == pytest.approx(4 / FR)


def test_hold_needs_the_pause_to_last_and_a_word_restarts_it() -> None:
    cfg = TurnConfig(head=0, threshold=0.5, hold=0.24, ignore_steps=0)  # 3 steps of hold
    detector = TurnDetector(cfg, FR)
    events: list[object] = steps([SPEECH] * 3)
    events += steps([SHORT_PAUSE] * 3, start=3)  # three steps over: not yet
    events.append(Word("late", 0.0))  # a word of this turn: the hold starts over
    events += steps([SHORT_PAUSE] * 3, start=6)
    events += steps([SHORT_PAUSE], start=9)  # the 4th step over since the word
    out = run(detector, events)
    assert [t for _, t in out] == [
        SpeechStarted(2, 0.0),
        EndOfTurn(9, pytest.approx(10 / FR), 0.9, 0),
    ]


def test_max_silence_ends_a_turn_the_heads_never_end() -> None:
    cfg = TurnConfig(head=3, threshold=0.5, max_silence=2.0, ignore_steps=0)
    detector = TurnDetector(cfg, FR)
    events: list[object] = steps([SPEECH] * 5)
    events.append(Word("one", 0.1))  # came out at 5 steps = 0.4 s
    events += steps([SPEECH] * 30, start=5)
    out = run(detector, events)
    # the heads go on saying speech: a new turn starts at the next step
    assert [type(t) for _, t in out] == [SpeechStarted, EndOfTurn, SpeechStarted]
    assert out[1][0] == 6 + 24  # the stream's 30th step: 2.4 s
    end = out[1][1]
    assert isinstance(end, EndOfTurn)
    assert end.time == pytest.approx(0.4 + 2.0) and end.probability == 0.1 and end.head == 3


def test_end_turn_cuts_a_turn_and_keeps_its_late_words() -> None:
    detector = TurnDetector(TurnConfig(ignore_steps=0), FR)
    assert run(detector, steps([SPEECH] * 3))[0][1] == SpeechStarted(2, 0.0)
    detector.end_turn(1.0)  # a manual commit of the audio up to 1 s
    assert not detector.speaking
    # steps of audio before 1 s (the model was behind) and late words do not start a turn
    assert run(detector, [*steps([SPEECH] * 9, start=3), Word("late", 0.5)]) == []
    # step 12's frame began at 0.96 s, before the cut; steps 13 to 15 are after it
    out = run(detector, [*steps([SPEECH] * 4, start=12), Word("new", 1.1)])
    assert [t for _, t in out] == [SpeechStarted(15, pytest.approx(13 / FR))]


def test_configure_keeps_the_turn_and_reset_forgets_everything() -> None:
    detector = TurnDetector(TurnConfig(head=2, ignore_steps=0), FR)
    run(detector, steps([SPEECH] * 3))
    detector.configure(TurnConfig(head=0, ignore_steps=0))
    assert detector.speaking
    out = run(detector, steps([SHORT_PAUSE], start=3))
    assert [t for _, t in out] == [EndOfTurn(3, pytest.approx(4 / FR), 0.9, 0)]
    detector.reset()
    assert (detector.steps, detector.speaking, detector.now) == (0, False, 0.0)
    assert run(detector, [Word("x", 0.0)]) == [(0, SpeechStarted(0, 0.0))]


def test_time_offset_puts_steps_on_the_words_clock() -> None:
    detector = TurnDetector(TurnConfig(ignore_steps=0, prefix_padding=0.0), FR, time_offset=1.0)
    out = run(detector, steps([PAUSE] * 12 + [SPEECH] * 3))  # 15 frames: 1.2 s of audio
    assert [t for _, t in out] == [SpeechStarted(14, pytest.approx(12 / FR - 1.0))]
    assert detector.now == pytest.approx(15 / FR - 1.0)


def test_other_events_are_ignored_and_missing_heads_are_named() -> None:
    detector = TurnDetector(TurnConfig(head=2), FR)
    assert detector.push(Marker(1)) == [] and detector.push(EndWord(1.0)) == []
    with pytest.raises(ValueError, match="needs 3 VAD heads; this step has 1"):
        detector.push(Step(0, (0.5,), 0))


@given(
    st.lists(
        st.one_of(
            st.tuples(*[st.floats(0.0, 1.0)] * 4),
            st.sampled_from(["", "word", " two "]),
        ),
        max_size=200,
    ),
    st.sampled_from(
        [
            TurnConfig(ignore_steps=0),
            TurnConfig.server_vad(silence_duration_ms=700),
            TurnConfig.semantic_vad("low"),
            TurnConfig.semantic_vad("high"),
        ]
    ),
)
def test_starts_and_ends_alternate_in_time_order(items: list[object], cfg: TurnConfig) -> None:
    detector = TurnDetector(cfg, FR)
    out: list[object] = []
    step = 0
    for item in items:
        if isinstance(item, tuple):
            out += detector.push(Step(step, item, 0))
            step += 1
        else:
            out += detector.push(Word(item, max(detector.now - 0.5, 0.0)))
    kinds = [type(t) for t in out]
    assert kinds == [SpeechStarted, EndOfTurn] * (len(kinds) // 2) + [SpeechStarted] * (
        len(kinds) % 2
    )
    assert detector.speaking == (len(kinds) % 2 == 1)
    times = [t.time for t in out]  # type: ignore[attr-defined]
    assert times == sorted(times)


def test_the_detector_is_pure_python() -> None:
    code = "import sys, dsm_stt.engine.turns; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(done.stdout.split())
    assert not loaded & {"torch", "numpy", "asyncio", "dsm_stt.server", "msgpack"}
