"""Runner: the engine worker thread, admission, extensions, back-pressure, slow clients, failures.

Driven with a fake engine (the token of a slot is read from its frame's first sample) so every
expectation is exact and the tests take milliseconds of model time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from dsm_stt.engine.events import Closed, EndWord, Marker, Step, Word
from dsm_stt.engine.scheduler import Scheduler, StepOutput
from dsm_stt.server.metrics import ServerMetrics
from dsm_stt.server.protocol import Error, Flushed, Ready
from dsm_stt.server.runner import Channel, Dropped, ReadAhead, Runner, engine_thread

F = 1920
D = 2  # text delay of the fake model, in steps
WORD, PAD = 0, 3


class FakeEngine:
    """Token of an active slot = round(first sample * 1000) - 10 (silence → PAD)."""

    def __init__(self, batch_size: int, delay_s: float = 0.0, has_vad: bool = True) -> None:
        self.batch_size = batch_size
        self.frame_size = F
        self.has_vad = has_vad
        self.delay_s = delay_s
        self.fail = False
        self.steps = 0
        self.ended = 0  # steps finished by end_step
        self.end_hook: Callable[[], None] | None = None  # runs inside end_step
        self.thread: str | None = None

    def move_slot(self, src: int, dst: int) -> None:  # tokens depend on the frame alone
        self.end_step()

    def end_step(self) -> None:
        if self.ended < self.steps:
            self.ended += 1
            if self.end_hook is not None:
                self.end_hook()

    def begin_step(self, pcm: np.ndarray, active: np.ndarray, reset: np.ndarray) -> StepOutput:
        self.end_step()
        self.thread = threading.current_thread().name
        if self.fail:
            raise RuntimeError("device lost")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.steps += 1
        tokens = [round(float(p[0]) * 1000) - 10 if p.any() else PAD for p in pcm]
        return StepOutput(tokens, [(0.5,)] * self.batch_size)


def frames(*tokens: int) -> np.ndarray:
    return np.concatenate([np.full(F, (t + 10) / 1000, dtype=np.float32) for t in tokens])


SPEECH = frames(PAD, PAD, WORD, 6, WORD, PAD)  # one word: Word("6", 0.08)


def make_runner(batch_size: int = 2, **kwargs: object) -> tuple[Runner, FakeEngine]:
    engine = FakeEngine(batch_size, **kwargs)  # type: ignore[arg-type]
    runner = Runner(Scheduler(engine, D, lambda ids: "-".join(map(str, ids))), ServerMetrics())
    runner.start()
    return runner, engine


async def collect(ch: Channel, until: type, timeout: float = 5.0) -> list[object]:
    """Messages up to and including the first one of type ``until``."""
    out: list[object] = []

    async def read() -> list[object]:
        while True:
            for item in await ch.get():
                out.append(item)
                if isinstance(item, until):
                    return out

    return await asyncio.wait_for(read(), timeout)


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_words_markers_and_steps_come_back_from_the_worker_thread() -> None:
    async def main() -> None:
        runner, engine = make_runner()
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            # With D = 2, a WORD token at step s is at (s - 1) * 80 ms; step 0's token is ignored.
            runner.feed(ch, frames(PAD, PAD, WORD, 7, 8, WORD, 9, WORD))
            runner.marker(ch, 42)
            runner.feed(ch, frames(PAD, PAD, PAD))
            out = await collect(ch, Marker)
            assert engine.thread == "dsm-stt-engine"
            words = [m for m in out if isinstance(m, Word | EndWord)]
            assert words == [
                Word("7-8", 0.08, (7, 8)),
                EndWord(0.32),
                Word("9", 0.32, (9,)),
                EndWord(0.48),
            ]
            steps = [m for m in out if isinstance(m, Step)]
            assert [s.step_idx for s in steps] == list(range(10))  # marker: 8 frames + D
            assert out[-1] == Marker(42)
        finally:
            runner.stop()
        # read once the worker has stopped: a step may still be under way before
        assert runner.metrics.steps._value.get() == engine.steps  # type: ignore[union-attr]

    run(main())


def test_messages_leave_before_the_step_is_finished() -> None:
    """The worker hands out a step's messages, then finishes the step (its Mimi half)."""

    async def main() -> None:
        runner, engine = make_runner()
        finishing, release = threading.Event(), threading.Event()

        def hold() -> None:
            finishing.set()
            release.wait(5)

        engine.end_hook = hold
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, frames(PAD))
            out = await collect(ch, Step)
            # the Step came while the step's second half was still held
            assert out[-1].step_idx == 0 and not release.is_set()  # type: ignore[attr-defined]
            assert await asyncio.to_thread(finishing.wait, 5)
            assert runner.metrics.steps._value.get() == 0  # type: ignore[union-attr]
            release.set()
            for _ in range(100):  # the step is counted once finished
                if runner.metrics.steps._value.get() == 1:  # type: ignore[union-attr]
                    break
                await asyncio.sleep(0.02)
            assert runner.metrics.steps._value.get() == 1  # type: ignore[union-attr]
            assert engine.ended == 1
        finally:
            release.set()
            runner.stop()

    run(main())


def test_full_runner_refuses_then_queue_timeout_waits_for_a_slot() -> None:
    async def main() -> None:
        runner, _ = make_runner(batch_size=1)
        try:
            a, b, c = runner.channel(), runner.channel(), runner.channel()
            assert await runner.admit(a)
            assert runner.used_slots == 1
            assert not await runner.admit(b)  # no waiting: refused at once
            t0 = time.monotonic()
            assert not await runner.admit(b, timeout=0.2)  # waits, then gives up
            assert 0.15 < time.monotonic() - t0 < 2.0
            waiting = asyncio.ensure_future(runner.admit(c, timeout=10.0))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            t0 = time.monotonic()
            runner.remove(a)  # the disconnect frees the slot for the waiter at once
            assert await waiting
            assert time.monotonic() - t0 < 1.0
            assert runner.used_slots == 1
        finally:
            runner.stop()

    run(main())


def test_remove_frees_the_slot_immediately_and_stale_commands_are_ignored() -> None:
    async def main() -> None:
        runner, _ = make_runner(batch_size=1, delay_s=0.005)
        try:
            a = runner.channel()
            assert await runner.admit(a)
            runner.feed(a, frames(*[5] * 200))  # 16 s of audio still queued
            runner.remove(a)
            runner.feed(a, frames(5))  # racing with the removal: ignored
            b = runner.channel()
            t0 = time.monotonic()
            assert await runner.admit(b)
            assert time.monotonic() - t0 < 0.5
            assert runner.metrics.connection_steps._sum.get() < 200  # type: ignore[union-attr]
        finally:
            runner.stop()

    run(main())


def test_flush_answers_flushed_right_after_the_last_words() -> None:
    async def main() -> None:
        runner, _ = make_runner()
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.flush(ch, 1)  # nothing sent yet: answered at once
            assert [m for m in await collect(ch, Flushed)] == [Flushed(1)]
            runner.feed(ch, frames(PAD, PAD, WORD, 7, 8)[: 4 * F + 100])  # ends mid-frame
            runner.flush(ch, 2)
            out = await collect(ch, Flushed)
            words = [m for m in out if isinstance(m, Word | EndWord)]
            # The pending word is finished by the flush, ending where the audio ended.
            assert words == [Word("7-8", 0.08, (7, 8)), EndWord((4 * F + 100) / 24000)]
            assert out[-1] == Flushed(2)
            assert not any(isinstance(m, Word) for m in out[out.index(words[-1]) + 1 :])
            # The stream goes on after a flush, on the same clock: 5 frames + D + 1 of padding.
            runner.feed(ch, frames(WORD, 9, WORD, PAD, PAD))
            runner.flush(ch, 3)
            out = await collect(ch, Flushed)
            assert [m for m in out if isinstance(m, Word)] == [Word("9", 0.56, (9,))]
        finally:
            runner.stop()

    run(main())


def test_reset_releases_markers_and_flushes_then_answers_ready() -> None:
    async def main() -> None:
        runner, _ = make_runner()
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, frames(PAD, PAD, WORD, 7)[: 3 * F + 10])  # a partial frame pending
            runner.marker(ch, 9)
            runner.flush(ch, 4)
            runner.reset(ch)
            out = await collect(ch, Ready)
            tail = [m for m in out if not isinstance(m, Step | Word | EndWord)]
            assert tail == [Marker(9), Flushed(4), Ready()]
            # After the reset the stream restarts at time 0 with a fresh model state.
            runner.feed(ch, SPEECH)
            runner.flush(ch, 5)
            out = await collect(ch, Flushed)
            assert [m for m in out if isinstance(m, Word)] == [Word("6", 0.08, (6,))]
            steps = [m.step_idx for m in out if isinstance(m, Step)]
            assert steps == sorted(steps)
        finally:
            runner.stop()

    run(main())


def test_scheduler_errors_come_back_as_error_messages() -> None:
    async def main() -> None:
        runner, _ = make_runner()
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, np.array([0.0, np.nan], dtype=np.float32))
            (msg,) = await collect(ch, Error)
            assert "NaN" in msg.message  # type: ignore[attr-defined]
            runner.feed(ch, SPEECH)
            runner.flush(ch, 1)
            assert Word("6", 0.08, (6,)) in await collect(ch, Flushed)
        finally:
            runner.stop()

    run(main())


def test_a_client_that_does_not_read_is_dropped_and_the_others_go_on() -> None:
    async def main() -> None:
        runner, _ = make_runner(batch_size=2)
        try:
            overflowed = asyncio.Event()
            slow = runner.channel(max_pending=50, on_overflow=overflowed.set)
            fast = runner.channel()
            assert await runner.admit(slow)
            assert await runner.admit(fast)
            runner.feed(slow, frames(*[5] * 100))  # 100 Step messages nobody reads
            runner.feed(fast, frames(*[5, WORD] * 50))
            runner.flush(fast, 1)
            out = await collect(fast, Flushed)
            assert sum(isinstance(m, Step) for m in out) == 100 + D + 1
            assert overflowed.is_set() and slow.overflowed
            assert slow.pending <= 51  # nothing was queued for it after the overflow
        finally:
            runner.stop()

    run(main())


def test_wait_for_room_holds_a_fast_sender_back() -> None:
    async def main() -> None:
        runner, engine = make_runner(batch_size=1, delay_s=0.002)
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, frames(*[5] * 40))
            assert ch.backlog() == 40 * F  # counted at once, before the worker sees it
            await ch.wait_for_room(4 * F)
            assert ch.backlog() <= 4 * F
            assert engine.steps >= 36
        finally:
            runner.stop()

    run(main())


def test_read_ahead_lets_sessions_read_on_within_one_budget() -> None:
    """Each session may queue ``floor`` samples; beyond that only while everyone's audio past
    their floors fits the budget; the held session goes on as the model catches up."""

    async def main() -> None:
        runner, engine = make_runner(batch_size=2, delay_s=0.002)
        try:
            a, b = runner.channel(), runner.channel()
            assert await runner.admit(a) and await runner.admit(b)
            ahead = ReadAhead(floor=4 * F, budget=10 * F)
            ahead.channels |= {a, b}
            assert ahead.has_room(a, 100 * F)  # at or under its floor: always
            a.inflight = 12 * F  # (as a feed on its way counts it) 8 frames past its floor
            assert ahead.extra() == 8 * F
            assert ahead.has_room(a, 2 * F) and not ahead.has_room(a, 3 * F)
            assert ahead.has_room(b, 50 * F)  # b is under its own floor
            b.inflight = 6 * F  # 2 past: the budget is spent
            assert not ahead.has_room(a, F) and not ahead.has_room(b, F)
            a.inflight = b.inflight = 0
            runner.feed(a, frames(*[5] * 20))
            await ahead.wait_for_room(a, 2 * F)  # held until the model has read enough
            assert a.backlog() <= 12 * F and engine.steps >= 8
        finally:
            runner.stop()

    run(main())


def test_step_metrics_time_the_tick_and_the_engine_call_within_it() -> None:
    async def main() -> None:
        runner, engine = make_runner(delay_s=0.02)
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, SPEECH)
            runner.flush(ch, 1)
            await collect(ch, Flushed)
            sample = runner.metrics.registry.get_sample_value  # type: ignore[union-attr]
            for _ in range(100):  # a step is counted once finished, after its messages
                if sample("asr_model_steps_total") == engine.steps:
                    break
                await asyncio.sleep(0.02)
            steps = sample("asr_model_steps_total")
            assert steps == engine.steps > 0
            assert sample("asr_engine_step_duration_count") == steps
            assert sample("asr_model_step_duration_count") == steps
            engine_s = sample("asr_engine_step_duration_sum")
            assert 0.02 * steps <= engine_s <= sample("asr_model_step_duration_sum")
        finally:
            runner.stop()

    run(main())


def test_an_idle_worker_sleeps() -> None:
    async def main() -> None:
        runner, _ = make_runner()
        try:
            ch = runner.channel()
            assert await runner.admit(ch)
            runner.feed(ch, frames(5, 5)[:-1])  # less than two frames: one step, then idle
            await asyncio.sleep(0.2)
            before = runner.iterations
            await asyncio.sleep(0.3)
            assert runner.iterations == before
        finally:
            runner.stop()

    run(main())


def test_a_failing_model_step_drops_the_streams_and_the_runner_keeps_serving() -> None:
    async def main() -> None:
        runner, engine = make_runner()
        try:
            a, b = runner.channel(), runner.channel()
            assert await runner.admit(a)
            assert await runner.admit(b)
            engine.fail = True
            runner.feed(a, frames(5))
            (msg,) = await collect(a, Dropped)
            assert "device lost" in msg.reason  # type: ignore[attr-defined]
            assert (await collect(b, Dropped))[-1] == msg
            assert runner.used_slots == 0
            engine.fail = False
            c = runner.channel()
            assert await runner.admit(c)
            runner.feed(c, SPEECH)
            runner.flush(c, 1)
            assert Word("6", 0.08, (6,)) in await collect(c, Flushed)
        finally:
            runner.stop()

    run(main())


def test_close_then_stop() -> None:
    async def main() -> None:
        runner, _ = make_runner()
        a, b = runner.channel(), runner.channel()
        assert await runner.admit(a)
        assert await runner.admit(b)
        runner.feed(a, SPEECH[: 4 * F])
        runner.close(a)  # graceful: last words, then Closed
        out = await collect(a, Closed)
        assert [m for m in out if isinstance(m, Word)] == [Word("6", 0.08, (6,))]
        assert runner.used_slots == 1
        runner.stop()
        assert isinstance((await collect(b, Dropped))[-1], Dropped)
        assert not await runner.admit(runner.channel())  # a stopped runner refuses
        assert not runner.running

    run(main())


def test_cancelled_admission_does_not_leak_a_slot() -> None:
    async def main() -> None:
        runner, _ = make_runner(batch_size=1)
        try:
            a, b = runner.channel(), runner.channel()
            assert await runner.admit(a)
            waiting = asyncio.ensure_future(runner.admit(b, timeout=10))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            runner.remove(a)
            c = runner.channel()
            assert await runner.admit(c, timeout=1.0)  # b's removal left the slot free
        finally:
            runner.stop()

    run(main())


def test_the_engine_thread_runs_calls_in_order_on_one_daemon_thread() -> None:
    worker = engine_thread()
    try:
        futures = [worker.submit(lambda i=i: (i, threading.get_ident())) for i in range(5)]
        results = [f.result(timeout=5) for f in futures]
        assert [i for i, _ in results] == list(range(5))
        assert len({ident for _, ident in results}) == 1
        assert results[0][1] != threading.get_ident()
        name = worker.submit(lambda: threading.current_thread().name).result(timeout=5)
        assert name == "dsm-stt-engine"
        assert worker.submit(threading.current_thread).result(timeout=5).daemon
        failing = worker.submit(int, "not a number")
        with pytest.raises(ValueError, match="invalid literal"):
            failing.result(timeout=5)
        assert worker.submit(pow, 2, exp=5).result(timeout=5) == 32  # keywords pass through
    finally:
        worker.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(int, "1")
