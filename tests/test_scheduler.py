"""Scheduler: slots, FIFOs, markers, flush/close padding and slot independence, on a fake engine."""

from __future__ import annotations

import time
from collections.abc import Hashable

import numpy as np
import pytest

from dsm_stt.engine.events import (
    Closed,
    EndWord,
    Event,
    Flushed,
    Marker,
    Restarted,
    Step,
    Word,
)
from dsm_stt.engine.scheduler import (
    Scheduler,
    SchedulerError,
    StepOutput,
    StreamState,
    StreamStateError,
    UnknownStreamError,
)

F = 1920
PAD, WORD, COUNT = 3, 0, -2  # COUNT: "emit 100 + steps since this slot's last reset"


def frame_of(token: int) -> np.ndarray:
    """A constant frame the fake engine reads back as ``token`` (zeros read as PAD)."""
    return np.full(F, (token + 3) / 1000, dtype=np.float32)


def audio(tokens: list[int]) -> np.ndarray:
    return np.concatenate([frame_of(k) for k in tokens]) if tokens else np.zeros(0, np.float32)


def decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


class FakeEngine:
    """Deterministic per-slot model: the token of a slot depends only on that slot's own frames
    and on how many steps it has taken since its last reset (so missed resets, frames routed to
    the wrong slot, or idle slots advancing all change the output)."""

    def __init__(self, batch_size: int, has_vad: bool = False) -> None:
        self.batch_size = batch_size
        self.frame_size = F
        self.has_vad = has_vad
        self.silence = PAD  # what silent frames read as
        self.count = np.zeros(batch_size, dtype=np.int64)
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.ended = 0  # steps finished by end_step
        self.moves: list[tuple[int, int]] = []  # move_slot calls

    def begin_step(self, pcm: np.ndarray, active: np.ndarray, reset: np.ndarray) -> StepOutput:
        self.end_step()
        assert pcm.shape == (self.batch_size, F) and pcm.dtype == np.float32
        assert active.shape == reset.shape == (self.batch_size,)
        assert active.dtype == reset.dtype == np.bool_
        assert not (reset & ~active).any(), "reset of an inactive slot"
        assert not pcm[~active].any(), "idle slots must get zeros"
        self.calls.append((pcm.copy(), active.copy(), reset.copy()))
        self.count[reset] = 0
        tokens = []
        for b in range(self.batch_size):
            if not active[b]:
                tokens.append(777)  # garbage the scheduler must ignore
                continue
            code = round(float(pcm[b, 0]) * 1000) - 3
            if code == COUNT:
                token = 100 + int(self.count[b])
            elif code < 0 or not pcm[b].any():
                token = self.silence
            else:
                token = code
            tokens.append(token)
            self.count[b] += 1
        prs = [(b / 10, float(self.count[b])) for b in range(self.batch_size)]
        return StepOutput(tokens, prs if self.has_vad else [() for _ in range(self.batch_size)])

    def end_step(self) -> None:
        self.ended += self.begun > self.ended

    def move_slot(self, src: int, dst: int) -> None:
        self.end_step()
        self.moves.append((src, dst))
        self.count[dst] = self.count[src]

    @property
    def begun(self) -> int:
        return len(self.calls)

    def frames(self, slot: int) -> list[np.ndarray]:
        return [pcm[slot] for pcm, active, _ in self.calls if active[slot]]


def drain(sched: Scheduler, limit: int = 1000) -> dict[Hashable, list[Event]]:
    out: dict[Hashable, list[Event]] = {}
    for _ in range(limit):
        if not sched.has_work():
            return out
        for sid, events in sched.tick().items():
            out.setdefault(sid, []).extend(events)
    raise AssertionError("scheduler did not run out of work")


def make(batch_size: int = 4, delay: int = 2, **kw: object) -> tuple[Scheduler, FakeEngine]:
    engine = FakeEngine(batch_size, has_vad=bool(kw.pop("has_vad", False)))
    return Scheduler(engine, delay, decode, **kw), engine  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ framing


def test_feeds_of_any_length_reassemble_the_same_frames() -> None:
    sched, engine = make(batch_size=2)
    rng = np.random.default_rng(0)
    signal = rng.uniform(-1, 1, size=F * 7 + 123).astype(np.float32)
    assert sched.admit("a")
    cuts = np.sort(rng.choice(np.arange(1, signal.size), size=40, replace=False))
    pieces = np.split(signal, cuts)
    pieces.insert(3, np.zeros(0, np.float32))  # empty feeds are fine
    for i, piece in enumerate(pieces):
        sched.feed("a", piece if i % 2 else piece.tolist())  # ndarray or list of floats
        if i % 5 == 0:
            sched.tick()
    drain(sched)
    assert sched.steps("a") == 7
    assert sched.buffered_samples("a") == 123  # the partial frame waits for more audio
    np.testing.assert_array_equal(np.concatenate(engine.frames(0)), signal[: 7 * F])


def test_feed_copies_the_callers_buffer() -> None:
    sched, engine = make()
    sched.admit("a")
    buf = np.ones(F, dtype=np.float32) * 0.25
    sched.feed("a", buf)
    buf[:] = 0.5
    sched.tick()
    assert (engine.frames(0)[0] == 0.25).all()


def test_feed_of_a_long_stream_in_tiny_pieces_is_linear() -> None:
    sched, engine = make(batch_size=1)
    sched.admit("a")
    signal = np.arange(F * 50, dtype=np.float32) / (F * 50)
    for piece in np.split(signal, 3000):
        sched.feed("a", piece)
    assert sched.buffered_samples("a") == signal.size
    drain(sched)
    np.testing.assert_array_equal(np.concatenate(engine.frames(0)), signal)


def test_each_stream_advances_at_most_one_frame_per_tick() -> None:
    sched, engine = make(batch_size=3)
    for sid in "abc":
        sched.admit(sid)
    sched.feed("a", audio([PAD] * 10))
    sched.feed("b", audio([PAD]))
    assert sched.tick().keys() == {"a", "b"}
    assert (sched.steps("a"), sched.steps("b"), sched.steps("c")) == (1, 1, 0)
    assert engine.calls[-1][1].tolist() == [True, True, False]
    assert sched.tick().keys() == {"a"}
    assert sched.buffered_samples("a") == 8 * F
    assert sched.step_count == 2


def test_no_work_means_no_engine_call() -> None:
    sched, engine = make()
    assert sched.tick() == {}
    sched.admit("a")
    sched.feed("a", np.zeros(F - 1, np.float32))
    assert not sched.has_work()
    assert sched.tick() == {}
    assert engine.calls == []


def test_the_engine_call_is_timed_with_both_halves() -> None:
    sched, engine = make()
    begin, end = engine.begin_step, engine.end_step

    def slow_begin(*args: object) -> StepOutput:
        time.sleep(0.01)
        return begin(*args)  # type: ignore[arg-type]

    def slow_end() -> None:
        time.sleep(0.01)
        end()

    engine.begin_step = slow_begin  # type: ignore[method-assign]
    engine.end_step = slow_end  # type: ignore[method-assign]
    assert sched.last_engine_seconds == 0.0
    sched.admit("a")
    sched.feed("a", np.zeros(3 * F, np.float32))
    start = time.perf_counter()
    sched.tick()
    assert (engine.begun, engine.ended) == (1, 0)  # the events come before the second half
    assert 0.01 <= sched.last_engine_seconds <= time.perf_counter() - start
    assert sched.settle() >= 0.01
    assert (engine.begun, engine.ended) == (1, 1)
    assert 0.02 <= sched.last_engine_seconds <= time.perf_counter() - start
    assert sched.settle() == 0.0  # nothing left to finish: the engine is not called
    sched.tick()  # not settled: the next step finishes it first
    assert (engine.begun, engine.ended) == (2, 1)
    sched.tick()
    assert (engine.begun, engine.ended) == (3, 2)


# ------------------------------------------------------------------------------- words


def test_tokens_become_words_with_the_stream_delay() -> None:
    sched, _ = make(delay=2)
    sched.admit("a")
    # step:          0    1     2   3   4     5   6
    sched.feed("a", audio([WORD, PAD, WORD, 10, 11, WORD, 12]))
    got = drain(sched)["a"]
    assert got == [Word("10 11", (3 - 2) / 12.5, (10, 11)), EndWord((6 - 2) / 12.5)]


def test_close_pads_flushes_the_last_word_and_frees_the_slot() -> None:
    sched, engine = make(batch_size=1, delay=3)
    sched.admit("a")
    sound = audio([PAD, PAD, WORD, 10, 11, WORD, 12, 13])[:-100]  # ends mid-frame
    sched.feed("a", sound)
    sched.close("a")
    assert sched.state("a") is StreamState.CLOSING
    assert sched.used_slots == 1
    with pytest.raises(StreamStateError, match="closing"):
        sched.feed("a", np.zeros(10, np.float32))
    got = drain(sched)["a"]
    end = sound.size / 24000
    # The padding is silence → PAD tokens: the last word comes out during the padding, and its
    # EndWord at close, capped at the end of the audio.
    assert got == [
        Word("10 11", (2 + 1 - 3) / 12.5, (10, 11)),
        EndWord((5 + 1 - 3) / 12.5),
        Word("12 13", (5 + 1 - 3) / 12.5, (12, 13)),
        EndWord(pytest.approx(end)),
        Closed(8 + 3 + 1),
    ]
    # Frames: the audio, zero-padded to a frame, then D + 1 silent frames.
    frames = engine.frames(0)
    assert len(frames) == 8 + 3 + 1
    np.testing.assert_array_equal(np.concatenate(frames)[: sound.size], sound)
    assert not np.concatenate(frames)[sound.size :].any()
    assert sched.free_slots == 1 and "a" not in sched
    with pytest.raises(UnknownStreamError):
        sched.feed("a", np.zeros(10, np.float32))


def test_close_emits_a_word_the_model_never_delimited() -> None:
    # This "model" hears silence as a piece, so no WORD/PAD ever ends the last word: close's
    # finish() still emits it and ends it where the audio ended.
    sched, engine = make(batch_size=1, delay=1)
    engine.silence = 42
    sched.admit("a")
    sched.feed("a", audio([WORD, 10, 11]))
    sched.close("a")
    assert drain(sched)["a"] == [
        Word("10 11 42 42", 0.0, (10, 11, 42, 42)),
        EndWord(pytest.approx(3 * F / 24000)),
        Closed(3 + 2),
    ]


def test_close_without_audio_frees_the_slot_on_the_next_tick() -> None:
    sched, engine = make(batch_size=1)
    sched.admit("a")
    sched.close("a")
    assert sched.has_work()
    assert sched.tick() == {"a": [Closed(0)]}
    assert engine.calls == [] and sched.free_slots == 1


def test_time_offset_is_applied_per_stream() -> None:
    sched, _ = make(delay=1, time_offset=0.5)
    sched.admit("a")
    sched.admit("b", time_offset=0.0)
    for sid in "ab":
        sched.feed(sid, audio([PAD] * 9 + [WORD, 10, WORD]))
    got = drain(sched)
    assert got["a"] == [Word("10", 9 / 12.5 - 0.5, (10,)), EndWord(11 / 12.5 - 0.5)]
    assert got["b"] == [Word("10", 9 / 12.5, (10,)), EndWord(11 / 12.5)]


def test_step_events_with_vad() -> None:
    sched, _ = make(batch_size=3, delay=1, has_vad=True)
    sched.admit("a")
    sched.admit("b")
    sched.feed("b", audio([PAD, PAD]))
    sched.feed("a", audio([PAD]))
    first = sched.tick()
    assert first == {"a": [Step(0, (0.0, 1.0), 0)], "b": [Step(0, (0.1, 1.0), F)]}
    assert sched.tick() == {"b": [Step(1, (0.1, 2.0), 0)]}


def test_no_step_events_without_vad() -> None:
    sched, _ = make(has_vad=False)
    sched.admit("a")
    sched.feed("a", audio([PAD] * 3))
    assert drain(sched) == {"a": []}


# ----------------------------------------------------------------------------- markers


def test_marker_waits_for_its_frames_and_follows_the_word_of_the_same_step() -> None:
    delay = 2
    sched, _ = make(delay=delay)
    sched.admit("a")
    sched.feed("a", audio([WORD, 10, 11])[: 2 * F + 5])  # 2 frames + 5 samples
    sched.marker("a", 7)  # target = 0 + 3 + D = 5 steps
    sched.feed("a", audio([11, 11, PAD])[5:])  # frame 2 completes; frames 3, 4 follow
    per_tick = [sched.tick().get("a", []) for _ in range(5)]
    assert all(Marker(7) not in events for events in per_tick[:4])
    # Step 4 (0-based) produces the PAD that completes the word, then the marker.
    assert per_tick[4] == [Word("10 11 11", 0.0, (10, 11, 11)), Marker(7)]
    assert not sched.has_work()


def test_marker_is_returned_by_close_without_trailing_silence() -> None:
    sched, _ = make(delay=1)
    sched.admit("a")
    sched.feed("a", audio([WORD, 10]))
    sched.marker("a", 1)  # target 0 + 2 + 1 steps
    sched.marker("a", 2)
    sched.close("a")  # 2 frames of padding: 4 steps
    assert drain(sched)["a"] == [
        Word("10", 0.0, (10,)),
        Marker(1),
        Marker(2),
        EndWord(pytest.approx(2 * F / 24000)),
        Closed(4),
    ]


def test_markers_still_pending_at_close_come_before_closed() -> None:
    # After a flush, close adds no padding: a marker sent after the flush would wait for D
    # frames that never come, so the close echoes it once everything queued is processed.
    sched, _ = make(delay=2)
    sched.admit("a")
    sched.marker("a", 1)
    sched.feed("a", audio([WORD, 10, PAD]))
    sched.flush("a")
    sched.marker("a", 2)  # target 0 + 6 + 2 = 8 steps
    sched.close("a")
    got = drain(sched)["a"]
    assert [e for e in got if isinstance(e, (Marker, Closed))] == [Marker(1), Marker(2), Closed(6)]
    sched.admit("b")
    sched.marker("b", 3)
    sched.close("b")
    assert sched.tick() == {"b": [Marker(3), Closed(0)]}


def test_markers_count_this_streams_steps_not_global_steps() -> None:
    sched, _ = make(delay=2)
    sched.admit("a")
    sched.admit("busy")
    sched.feed("busy", audio([PAD] * 10))
    sched.marker("a", 5)  # nothing fed on "a": target = 0 + 0 + 2
    events = [sched.tick() for _ in range(10)]
    assert all("a" not in e for e in events)  # global steps advance, "a" does not
    sched.feed("a", audio([PAD, PAD]))
    assert sched.tick().get("a") == []
    assert sched.tick().get("a") == [Marker(5)]


# ------------------------------------------------------------------ flush, reset, remove


def test_flush_ends_the_utterance_and_keeps_the_stream_open() -> None:
    delay = 2
    sched, engine = make(batch_size=1, delay=delay)
    sched.admit("a")
    first = audio([WORD, 10, 11])[:-7]
    sched.feed("a", first)
    sched.flush("a")
    got = drain(sched)["a"]
    assert got == [Word("10 11", 0.0, (10, 11)), EndWord(pytest.approx(first.size / 24000))]
    assert sched.state("a") is StreamState.OPEN
    assert sched.steps("a") == 3 + delay + 1
    sched.flush("a")  # nothing new: no more padding
    assert not sched.has_work()
    # Later audio follows the padding on the same clock.
    sched.feed("a", audio([WORD, 12, WORD]))
    got = drain(sched)["a"]
    s = 6  # first step after the flush
    assert got == [Word("12", (s + 1 - delay) / 12.5, (12,)), EndWord((s + 3 - delay) / 12.5)]
    assert len(engine.frames(0)) == 6 + 3


def test_flush_ids_are_answered_right_after_the_words_of_their_audio() -> None:
    delay = 2
    sched, _ = make(batch_size=2, delay=delay)
    sched.admit("a")
    sched.admit("busy")
    sched.feed("busy", audio([PAD] * 30))  # global steps run ahead of "a"'s own
    sched.feed("a", audio([WORD, 10, 11]))
    sched.flush("a", 7)
    got: list[Event] = []
    for _ in range(3 + delay):  # the audio and all but the last padding frame
        got.extend(sched.tick().get("a", []))
    assert got == [Word("10 11", 0.0, (10, 11))]  # no Flushed before its audio is through
    assert sched.tick()["a"] == [EndWord(3 / 12.5), Flushed(7)]
    # A flush with nothing new to pad still answers, once the queued audio is processed.
    sched.feed("a", audio([WORD, 12]))
    sched.flush("a", 8)
    sched.flush("a", 9)  # nothing queued after the padding of 8: waits for the same frame
    out = drain(sched)["a"]
    assert out[-2:] == [Flushed(8), Flushed(9)]
    assert [e for e in out if isinstance(e, Word)] == [Word("12", (6 + 1 - delay) / 12.5, (12,))]
    sched.flush("a", 10)  # nothing queued at all: answered by the next tick, no engine step
    assert sched.has_work()
    assert sched.tick() == {"a": [Flushed(10)]}
    with pytest.raises(SchedulerError, match="flush id must be an integer"):
        sched.flush("a", "x")  # type: ignore[arg-type]


def test_markers_and_flushes_come_back_in_the_order_their_audio_ends() -> None:
    sched, _ = make(batch_size=1, delay=2)
    sched.admit("a")
    sched.feed("a", audio([WORD, 10]))
    sched.flush("a", 1)  # padded: audio (2) + D + 1 frames -> target 5
    sched.marker("a", 2)  # target 5 + 2 = 7
    sched.flush("a", 3)  # nothing new: target 5, before the marker
    got = drain(sched)["a"]
    assert [e for e in got if isinstance(e, Marker | Flushed)] == [Flushed(1), Flushed(3)]
    sched.feed("a", audio([PAD, PAD]))
    assert [e for e in drain(sched)["a"] if isinstance(e, Marker)] == [Marker(2)]


def test_flushes_pending_at_close_or_reset_are_answered() -> None:
    sched, _ = make(batch_size=1, delay=2)
    sched.admit("a")
    sched.feed("a", audio([WORD, 10, 11]))
    sched.flush("a", 1)
    sched.tick()
    sched.close("a")  # the flush's audio is processed before the stream ends
    got = drain(sched)["a"]
    assert got.index(Flushed(1)) < got.index(Closed(6)) == len(got) - 1
    sched.admit("b")
    sched.feed("b", audio([WORD, 10, 11]))
    sched.marker("b", 4)
    sched.flush("b", 5)
    sched.tick()
    sched.reset("b")  # their audio is dropped: answered at once, then Restarted
    assert sched.tick() == {"b": [Marker(4), Flushed(5), Restarted()]}  # in target order


def test_reset_restarts_the_stream_and_echoes_pending_markers() -> None:
    sched, engine = make(batch_size=1, delay=1)
    sched.admit("a")
    sched.feed("a", audio([COUNT, COUNT, COUNT, COUNT]))
    sched.tick()
    sched.tick()
    sched.marker("a", 9)
    sched.reset("a")
    assert sched.buffered_samples("a") == 0 and sched.steps("a") == 0
    assert sched.tick() == {"a": [Marker(9), Restarted()]}  # echoed without an engine step
    assert len(engine.calls) == 2
    sched.feed("a", audio([COUNT, WORD]))
    got = drain(sched)["a"]
    assert engine.calls[2][2].tolist() == [True]  # the slot's state was reset first
    assert got == [Word("100", 0.0, (100,)), EndWord(1 / 12.5)]  # step counter restarted


def test_remove_frees_the_slot_at_once() -> None:
    sched, engine = make(batch_size=2)
    sched.admit("a")
    sched.admit("b")
    sched.feed("a", audio([PAD] * 5))
    sched.marker("a", 1)
    sched.remove("a")
    assert "a" not in sched and sched.free_slots == 1
    assert sched.admit("c") and sched.slot("c") == 0
    assert not sched.has_work()
    with pytest.raises(UnknownStreamError):
        sched.remove("a")
    assert engine.calls == []


# -------------------------------------------------------------------- slots and fairness


def solo(tokens: list[int], delay: int = 2) -> list[Event]:
    sched, _ = make(batch_size=1, delay=delay)
    sched.admit("x")
    sched.feed("x", audio(tokens))
    sched.close("x")
    return drain(sched)["x"]


SCRIPTS = {
    "s0": [WORD, 10, COUNT, PAD, WORD, 11],
    "s1": [COUNT, COUNT, WORD, 12, 13, PAD, WORD],
    "s2": [PAD, WORD, COUNT, WORD, 14],
    "s3": [WORD, 15, 16, 17, WORD, COUNT, PAD, 18],
    "s4": [COUNT, WORD, 19],
}


def test_more_streams_than_slots_are_admitted_as_others_close() -> None:
    sched, _ = make(batch_size=2)
    waiting = list(SCRIPTS)
    got: dict[Hashable, list[Event]] = {}
    admitted_at: dict[str, int] = {}
    ticks = 0
    while waiting or sched.has_work():
        while waiting and sched.admit(waiting[0]):
            sid = waiting.pop(0)
            admitted_at[sid] = ticks
            sched.feed(sid, audio(SCRIPTS[sid]))
            sched.close(sid)
        assert not waiting or sched.free_slots == 0
        for sid, events in sched.tick().items():
            got.setdefault(sid, []).extend(events)
        ticks += 1
    assert set(got) == set(SCRIPTS) and len(sched) == 0 and sched.free_slots == 2
    for sid, tokens in SCRIPTS.items():
        assert got[sid] == solo(tokens), sid  # a reused slot behaves like a fresh one
    assert admitted_at["s2"] > 0


def test_slot_independence_with_neighbours_joining_leaving_resetting_and_idle() -> None:
    delay = 2
    target = [COUNT, WORD, 10, COUNT, 11, PAD, WORD, COUNT, COUNT, 12, PAD, WORD, 13]
    chunks = np.split(audio(target), [F // 2, 3 * F, 3 * F + 7, 8 * F])

    def drive(sched: Scheduler, neighbours: bool) -> list[Event]:
        out: list[Event] = []
        if neighbours:
            for sid in ("n0", "n1"):
                sched.admit(sid)
                sched.feed(sid, audio([COUNT, WORD, 20, 21] * 3))
        sched.admit("t")
        for i in range(40):
            if i < len(chunks):
                sched.feed("t", chunks[i])
                sched.marker("t", i)
            if i == len(chunks):
                sched.close("t")
            if neighbours:
                if i == 2:
                    sched.remove("n0")
                if i == 3:
                    sched.admit("n2")  # takes the freed slot 0
                    sched.feed("n2", audio([COUNT] * 6))
                if i == 4:
                    sched.reset("n1")
                    sched.feed("n1", audio([WORD, 22, COUNT]))
                if i == 6:
                    sched.close("n1")
                # "n2" goes idle for a while then resumes
                if i == 14 and "n2" in sched:
                    sched.feed("n2", audio([COUNT, WORD]))
            for sid, events in sched.tick().items():
                if sid == "t":
                    out.extend(events)
        assert "t" not in sched
        return out

    alone = drive(make(batch_size=4, delay=delay, has_vad=False)[0], neighbours=False)
    crowded_sched, engine = make(batch_size=4, delay=delay, has_vad=False)
    crowded = drive(crowded_sched, neighbours=True)
    assert crowded == alone
    assert sum(isinstance(e, Word) for e in alone) >= 3
    assert [e for e in alone if isinstance(e, Marker)] == [Marker(i) for i in range(len(chunks))]
    assert alone[-1] == Closed(13 + delay + 1)
    # The target stream ran in slot 2 next to active neighbours.
    assert any(active[2] and active[:2].any() for _, active, _ in engine.calls)


def test_slot_independence_of_vad_steps() -> None:
    # With VAD, Step events differ only by the global step index.
    def run(neighbour: bool) -> list[Step]:
        sched, _ = make(batch_size=2, delay=1, has_vad=True)
        if neighbour:
            sched.admit("n")
            sched.feed("n", audio([COUNT] * 3))
        sched.admit("t")
        sched.feed("t", audio([COUNT] * 5))
        got = drain(sched)["t"]
        return [Step(0, (0.0, *e.prs[1:]), e.buffered_pcm) for e in got if isinstance(e, Step)]

    alone, crowded = run(False), run(True)
    assert len(alone) == 5 and [e.prs[1] for e in alone] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert crowded == alone


def test_used_slots_stay_packed_and_a_moved_stream_goes_on_unchanged() -> None:
    sched, engine = make(batch_size=4)
    for sid, tokens in (("a", [COUNT]), ("b", [COUNT] * 3), ("c", SCRIPTS["s3"])):
        sched.admit(sid)
        sched.feed(sid, audio(tokens))
        sched.close(sid)
    got = drain(sched)
    # a's slot 0 frees first: c leaves slot 2 for it, its state with it (the fake engine's
    # COUNT tokens would restart otherwise); b's slot 1 frees later, above c: no move
    assert engine.moves == [(2, 0)]
    assert got["c"] == solo(SCRIPTS["s3"]) and got["b"] == solo([COUNT] * 3)
    assert engine.calls[-1][1].tolist() == [True, False, False, False]
    # a stream that has not stepped yet moves without its (not yet reset) state
    sched.admit("x")
    sched.admit("y")
    sched.remove("x")
    sched.feed("y", audio([COUNT, WORD, 10]))
    sched.close("y")
    assert drain(sched)["y"] == solo([COUNT, WORD, 10])
    assert engine.moves == [(2, 0)] and engine.calls[-1][1].tolist() == [True] + [False] * 3


def test_lowest_free_slot_is_taken_and_full_batch_refuses() -> None:
    sched, _ = make(batch_size=3)
    assert [sched.admit(s) for s in "abc"] == [True] * 3
    assert not sched.admit("d")
    assert (sched.free_slots, sched.used_slots) == (0, 3)
    sched.remove("b")
    sched.remove("a")
    assert sched.admit("d") and sched.slot("d") == 0


# ------------------------------------------------------------------------------- errors


def test_errors_name_the_stream_and_the_problem() -> None:
    sched, _ = make(batch_size=1)
    for call in (
        lambda: sched.feed("ghost", np.zeros(3, np.float32)),
        lambda: sched.marker("ghost", 1),
        lambda: sched.flush("ghost"),
        lambda: sched.close("ghost"),
        lambda: sched.reset("ghost"),
        lambda: sched.remove("ghost"),
        lambda: sched.steps("ghost"),
    ):
        with pytest.raises(UnknownStreamError, match="ghost"):
            call()
    sched.admit("a")
    with pytest.raises(StreamStateError, match="already admitted"):
        sched.admit("a")
    with pytest.raises(SchedulerError, match="1-D"):
        sched.feed("a", np.zeros((2, 3), np.float32))
    with pytest.raises(SchedulerError, match="NaN"):
        sched.feed("a", np.array([0.0, np.nan]))
    with pytest.raises(SchedulerError, match="numeric"):
        sched.feed("a", ["x", "y"])  # type: ignore[list-item]
    with pytest.raises(SchedulerError, match="marker id"):
        sched.marker("a", 1.5)  # type: ignore[arg-type]
    assert sched.buffered_samples("a") == 0  # rejected input left nothing behind
    sched.close("a")
    for call in (
        lambda: sched.feed("a", np.zeros(3, np.float32)),
        lambda: sched.marker("a", 1),
        lambda: sched.flush("a"),
        lambda: sched.close("a"),
        lambda: sched.reset("a"),
    ):
        with pytest.raises(StreamStateError, match="'a'.*closing"):
            call()
    assert issubclass(SchedulerError, ValueError)


def test_engine_returning_the_wrong_batch_is_reported() -> None:
    class Broken(FakeEngine):
        def begin_step(self, pcm: np.ndarray, active: np.ndarray, reset: np.ndarray) -> StepOutput:
            return StepOutput([3], [()])

    sched = Scheduler(Broken(2), 2, decode)
    sched.admit("a")
    sched.feed("a", audio([PAD]))
    with pytest.raises(SchedulerError, match="1 tokens .* 2 slots"):
        sched.tick()
