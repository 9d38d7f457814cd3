"""WordAssembler: hand-written token sequences → Word / EndWord with spec §4.2/§4.3 timestamps."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsm_stt.engine.events as events_module
import dsm_stt.engine.scheduler as scheduler_module
import dsm_stt.engine.words as words_module
from dsm_stt.engine.events import Closed, EndWord, Marker, Step, Word
from dsm_stt.engine.words import WORD_TOKEN, WordAssembler

VOCAB = {1: "<unk>", 2: "</s>", 10: "hel", 11: "lo", 12: "world", 13: "!"}


def decode(ids: list[int]) -> str:
    return "".join(VOCAB.get(i, f"<{i}>") for i in ids)


def t(step: int, delay: int) -> float:
    """Time of a WORD token produced at 0-based step ``step`` (spec §4.3)."""
    return (step + 1 - delay) / 12.5


def run(tokens: list[int], delay: int = 1, **kw: float) -> list[Word | EndWord]:
    assembler = WordAssembler(delay, decode, **kw)
    out: list[Word | EndWord] = []
    for token in tokens:
        out.extend(assembler.push(token))
    return out


def test_word_at_the_very_start_then_word_token() -> None:
    # No WORD token before the first word: it starts at 0. The 0 after it both ends the word
    # (Word) and stamps its end (EndWord) on the same step.
    assert run([10, 11, 0, 12, 3, 0]) == [
        Word("hello", 0.0, (10, 11)),
        EndWord(t(2, 1)),
        Word("world", t(2, 1), (12,)),
        EndWord(t(5, 1)),
    ]


def test_step_results_arrive_on_the_right_step() -> None:
    assembler = WordAssembler(1, decode)
    assert assembler.push(0) == []
    assert assembler.push(10) == []
    assert assembler.pending_pieces == (10,)
    assert assembler.push(3) == [Word("hel", 0.0, (10,))]
    assert assembler.push(3) == []
    assert assembler.push(0) == [EndWord(t(4, 1))]
    assert assembler.step_idx == 5


def test_consecutive_word_tokens_move_the_start_time() -> None:
    # Each 0 updates last_stop_time even without a word; only the last one before the pieces
    # is the word's start.
    assert run([0, 0, 0, 10, 0]) == [Word("hel", t(2, 1), (10,)), EndWord(t(4, 1))]


def test_consecutive_pads_emit_nothing_more() -> None:
    assert run([10, 3, 3, 3, 0, 3, 3]) == [Word("hel", 0.0, (10,)), EndWord(t(4, 1))]


def test_pad_does_not_end_a_word_in_time() -> None:
    # A word delimited by PAD only gets its EndWord from the next WORD token.
    assert run([0, 10, 3, 3, 0, 11, 3]) == [
        Word("hel", t(0, 1), (10,)),
        EndWord(t(4, 1)),
        Word("lo", t(4, 1), (11,)),
    ]


def test_ids_1_and_2_are_pieces_like_any_other() -> None:
    assert run([0, 1, 2, 10, 3]) == [Word("<unk></s>hel", 0.0, (1, 2, 10))]


def test_text_is_the_decode_of_all_pieces() -> None:
    seen: list[list[int]] = []

    def recording_decode(ids: list[int]) -> str:
        seen.append(ids)
        return "X"

    assembler = WordAssembler(1, recording_decode)
    for token in [0, 10, 11, 13, 0]:
        assembler.push(token)
    assert seen == [[10, 11, 13]]


@pytest.mark.parametrize("delay", [6, 32])
def test_first_delay_minus_one_steps_are_ignored(delay: int) -> None:
    early = [10, 0, 11, 0, 12, 3] * delay
    tokens = [*early[: delay - 1], 0, 12, 13, 0, 3, 10, 3]
    s = delay - 1  # step of the first token that counts
    assert run(tokens, delay) == [
        Word("world!", t(s, delay), (12, 13)),
        EndWord(t(s + 3, delay)),
        Word("hel", t(s + 3, delay), (10,)),
    ]
    assert t(s, delay) == 0.0  # the first counted step is time 0


@pytest.mark.parametrize("delay", [1, 6, 32])
@pytest.mark.parametrize("step", [0, 1, 7, 40])
def test_end_word_time_formula(delay: int, step: int) -> None:
    # A word, then a 0 produced at 0-based step ``step`` → EndWord (step + 1 - D) / 12.5.
    if step < delay:
        step = delay + 1
    tokens = [3] * (step - 1) + [10, 0]
    assert run(tokens, delay) == [Word("hel", 0.0, (10,)), EndWord((step + 1 - delay) / 12.5)]


def test_known_values_for_the_two_published_delays() -> None:
    # Spec §4.3: D = 6 → a 0 at step 6 is 0.08 s; D = 32 → a 0 at step 44 is 1.04 s.
    assert run([3] * 5 + [10, 0], 6)[-1] == EndWord(0.08)
    assert run([3] * 43 + [10, 0], 32)[-1] == EndWord(pytest.approx(1.04))


def test_time_offset_is_subtracted_from_every_timestamp() -> None:
    tokens = [3, 3, 0, 10, 0, 11, 3, 0]
    plain = run(tokens, 2)
    shifted = run(tokens, 2, time_offset=1.0)
    assert len(plain) == len(shifted) == 4
    for a, b in zip(plain, shifted, strict=True):
        if isinstance(a, Word):
            assert b == dataclasses.replace(a, start_time=a.start_time - 1.0)
        else:
            assert b == EndWord(a.stop_time - 1.0)


def test_custom_frame_rate() -> None:
    assert run([10, 0], 1, frame_rate=25.0) == [Word("hel", 0.0, (10,)), EndWord(1 / 25)]


def test_finish_emits_the_pending_word_and_its_end() -> None:
    assembler = WordAssembler(2, decode)
    out = [e for token in [3, 3, 0, 10, 11] for e in assembler.push(token)]
    assert out == []
    # 5 steps done: a 0 now would be stamped (5 - 2) / 12.5.
    assert assembler.finish() == [Word("hello", t(2, 2), (10, 11)), EndWord((5 - 2) / 12.5)]
    assert assembler.finish() == []  # nothing left


def test_finish_ends_a_word_already_emitted() -> None:
    assembler = WordAssembler(1, decode)
    for token in [0, 10, 3, 3]:
        assembler.push(token)
    assert assembler.finish() == [EndWord((4 - 1) / 12.5)]


def test_finish_end_time_caps_but_never_precedes_the_start() -> None:
    assembler = WordAssembler(1, decode, time_offset=0.5)
    for token in [*[3] * 9, 0, 10, 3, 3, 3]:  # 0 at step 9 → start 0.8 - 0.5
        assembler.push(token)
    # Uncapped it would be (14 - 1) / 12.5 - 0.5 = 0.54.
    assert assembler.finish(end_time=0.4) == [EndWord(0.4)]
    for token in [0, 11]:  # 0 at step 14 → start 1.12 - 0.5
        assembler.push(token)
    assert assembler.finish(end_time=0.1) == [
        Word("lo", pytest.approx(0.62), (11,)),
        EndWord(pytest.approx(0.62)),
    ]


def test_finish_without_any_word_is_empty() -> None:
    assembler = WordAssembler(6, decode)
    for token in [10, 11, 12, 0, 3]:  # all inside the ignored warm-up
        assembler.push(token)
    assert assembler.finish() == []


def test_reset_restarts_the_clock_and_drops_pieces() -> None:
    assembler = WordAssembler(1, decode)
    for token in [3, 3, 0, 10, 11]:
        assembler.push(token)
    assembler.reset()
    assert assembler.step_idx == 0
    assert assembler.pending_pieces == ()
    assert [e for token in [12, 0] for e in assembler.push(token)] == [
        Word("world", 0.0, (12,)),
        EndWord(t(1, 1)),
    ]


def test_bad_arguments_are_rejected_with_clear_messages() -> None:
    with pytest.raises(ValueError, match="delay_tokens"):
        WordAssembler(-1, decode)
    with pytest.raises(ValueError, match="delay_tokens"):
        WordAssembler(2.0, decode)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="frame_rate"):
        WordAssembler(1, decode, frame_rate=0.0)
    with pytest.raises(ValueError, match="token"):
        WordAssembler(1, decode).push(-2)


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.sampled_from([0, 1, 3, 10, 11, 12]), max_size=80),
    delay=st.integers(min_value=0, max_value=8),
)
def test_invariants_on_random_sequences(tokens: list[int], delay: int) -> None:
    assembler = WordAssembler(delay, decode)
    out = [e for token in tokens for e in assembler.push(token)] + assembler.finish()
    # Every counted piece ends up in exactly one word, in order.
    counted = tokens[max(delay - 1, 0) :]
    assert [p for e in out if isinstance(e, Word) for p in e.tokens] == [
        p for p in counted if p not in (0, 3)
    ]
    # An EndWord always ends the Word just before it (several Words delimited by PAD only share
    # one EndWord), and after finish() the last word is ended. Times never go backwards.
    assert not out or isinstance(out[0], Word)
    assert not out or isinstance(out[-1], EndWord)
    for before, event in itertools.pairwise(out):
        if isinstance(event, EndWord):
            assert isinstance(before, Word)
            assert before.start_time <= event.stop_time
    starts = [e.start_time for e in out if isinstance(e, Word)]
    stops = [e.stop_time for e in out if isinstance(e, EndWord)]
    assert starts == sorted(starts)
    assert stops == sorted(stops)
    assert all(x >= 0.0 for x in starts)


def test_events_are_frozen_values() -> None:
    word = Word("hi", 0.5, (1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        word.text = "ho"  # type: ignore[misc]
    assert Word("hi", 0.5) == Word("hi", 0.5, ())
    assert Step(3, (0.5,), 10) == Step(3, (0.5,), 10)
    for event in (word, EndWord(1.0), Marker(4), Closed(2)):
        assert not hasattr(event, "__dict__")  # slots


def test_engine_bookkeeping_modules_do_not_import_torch() -> None:
    # The scheduler and word assembly are pure Python + numpy (design §1): check their imports.
    for module in (events_module, words_module, scheduler_module):
        tree = ast.parse(Path(module.__file__).read_text())
        roots = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "torch" not in roots, module.__name__
        assert roots <= {
            "__future__",
            "bisect",
            "collections",
            "dataclasses",
            "enum",
            "heapq",
            "operator",
            "time",  # the scheduler times the engine call (a metric)
            "typing",
            "numpy",
            "dsm_stt",
        }, (module.__name__, roots)


@pytest.mark.parametrize("hours", [0, 3, 24])
def test_timestamps_stay_exact_to_the_frame_for_hours(hours: int) -> None:
    """Times are step counts over the frame rate in float64: at hour 24 (1,080,000 steps of
    the 1B) a word's start and end are still the exact frame times, the same steps later."""
    delay = 6
    assembler = WordAssembler(delay, decode)
    start = hours * 3600 * 25 // 2 + 100  # steps of 80 ms: ``hours`` and 8 s in
    assembler.step_idx = start  # a stream that far in (pushing a day of tokens takes long)
    events = [e for token in (WORD_TOKEN, 5, 6, WORD_TOKEN) for e in assembler.push(token)]
    word, end = events
    assert isinstance(word, Word) and isinstance(end, EndWord)
    assert word.start_time == (start + 1 - delay) / 12.5
    assert end.stop_time - word.start_time == pytest.approx(0.24, abs=1e-9)
    assert round(word.start_time * 12.5) == start + 1 - delay  # on a frame boundary
