"""Streams over a fixed batch of slots: admit / feed / marker / flush / close, one tick at a time.

Owns the slot table, each stream's PCM FIFO, its lifecycle, its word assembler and its pending
markers and flushes (answered here, in the stream's own steps), and the loop body of the engine: every ``tick`` *schedules* (one 1920-sample frame from
every stream that has one, spec §5.3 / §4.7), *executes* (one engine step over all slots with
an active and a reset mask) and *updates* (tokens → words, VAD steps, markers, closes). The
step's Mimi half does not change its output, so ``tick`` returns the events before it:
``settle`` runs it once the caller has sent them (the next ``tick`` does, otherwise). It is
pure Python + numpy: the engine behind ``StepEngine`` owns every tensor, and the server owns
threads, sockets and the wire format.

Differences from moshi-server, on purpose:

* Markers are counted in the stream's own steps (target = frames processed + frames queued +
  D), so other streams cannot make a marker come back before its audio was transcribed (§4.5).
* ``close`` and ``flush`` append the trailing silence themselves (D + 1 frames after zero-padding
  the partial frame), so callers never send silence to get their last words out (§4.4).
* A stream takes at most one frame per tick whatever its message sizes (no one-message-per-step
  throttling, §5.3).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import operator
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dsm_stt.engine.events import Closed, Event, Flushed, Marker, Restarted, Step, StepOutput
from dsm_stt.engine.words import WordAssembler


class SchedulerError(ValueError):
    """A request the scheduler cannot honour; the message names the stream and the problem."""


class UnknownStreamError(SchedulerError):
    """The stream id was never admitted, or has been closed or removed."""


class StreamStateError(SchedulerError):
    """The request is not allowed in the stream's current lifecycle state."""


class StreamState(enum.Enum):
    """Lifecycle of an admitted stream. CLOSED is terminal: the stream has left the table."""

    OPEN = "open"  # accepts audio, markers, flush, reset, close
    CLOSING = "closing"  # close() was called: draining its queue, then Closed
    CLOSED = "closed"


_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    StreamState.OPEN: frozenset({StreamState.CLOSING, StreamState.CLOSED}),
    StreamState.CLOSING: frozenset({StreamState.CLOSED}),
    StreamState.CLOSED: frozenset(),
}


class StepEngine(Protocol):
    """The batched model step the scheduler drives (implemented by ``engine.Engine``).

    ``begin_step`` must not keep references to the arrays it is given: they belong to the
    scheduler.
    """

    batch_size: int
    frame_size: int
    has_vad: bool

    def begin_step(self, pcm: np.ndarray, active: np.ndarray, reset: np.ndarray) -> StepOutput:
        """pcm float32 [B, frame_size]; active bool [B]; reset bool [B], applied before the step
        to the slots that start a new stream (always a subset of ``active``). Returns the
        step's output; the rest of the step waits for ``end_step`` (or the next call)."""
        ...

    def end_step(self) -> None:
        """Finish the step ``begin_step`` started (nothing if there is none)."""
        ...

    def move_slot(self, src: int, dst: int) -> None:
        """Carry the stream in slot ``src`` on in slot ``dst``, its model state included
        (finishing a pending step first); ``src`` is reset before it is used again."""
        ...


class _PcmQueue:
    """FIFO of float32 samples kept as a deque of chunks: O(1) append, frames copied out once."""

    __slots__ = ("_chunks", "_head", "samples")

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self._head = 0  # samples of _chunks[0] already consumed
        self.samples = 0

    def push(self, pcm: np.ndarray) -> None:
        if pcm.size:
            self._chunks.append(pcm)
            self.samples += pcm.size

    def pop_into(self, out: np.ndarray) -> None:
        """Move the next ``len(out)`` samples into ``out`` (the caller checked there are enough)."""
        n = out.shape[0]
        filled = 0
        while filled < n:
            chunk = self._chunks[0]
            take = min(n - filled, chunk.size - self._head)
            out[filled : filled + take] = chunk[self._head : self._head + take]
            filled += take
            self._head += take
            if self._head == chunk.size:
                self._chunks.popleft()
                self._head = 0
        self.samples -= n

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0
        self.samples = 0


@dataclass(frozen=True, slots=True)
class _FlushMark:
    """A flush waiting for its audio: finish the words there (if it padded), then answer."""

    end_time: float | None  # seconds (event clock) where its audio ended; None: nothing new
    flush_id: int | None  # answered with Flushed(flush_id); None: nothing to answer


@dataclass(eq=False)
class _Stream:
    """Everything the scheduler knows about one admitted stream."""

    id: Hashable
    slot: int
    assembler: WordAssembler
    queue: _PcmQueue = field(default_factory=_PcmQueue)
    state: StreamState = StreamState.OPEN
    needs_reset: bool = True  # the slot's model state is reset on this stream's next step
    steps: int = 0  # frames processed since admission or the last reset
    timeline: int = 0  # samples queued since then, audio and padding: the clock of the events
    audio_end: int = 0  # timeline position where the last audio fed ended
    unpadded: bool = False  # audio was fed since the last flush/close padding
    # What happens when ``steps`` reaches a target, in target order (ties in request order):
    # echo a Marker, or answer a flush.
    milestones: list[tuple[int, Marker | _FlushMark]] = field(default_factory=list)
    end_time: float | None = None  # set by close(): seconds where the audio ended
    outbox: list[Event] = field(default_factory=list)  # events produced between ticks

    def move_to(self, state: StreamState) -> None:
        if state not in _TRANSITIONS[self.state]:
            raise StreamStateError(
                f"stream {self.id!r} cannot go from {self.state.value} to {state.value}"
            )
        self.state = state


class Scheduler:
    """Maps streams onto the engine's fixed slots and turns its tokens into per-stream events.

    ``delay_tokens`` is the model's text delay D in steps, ``decode`` turns piece ids into text,
    ``time_offset`` (seconds) is subtracted from every timestamp (per-stream override in
    ``admit``). Not thread-safe: one thread owns it (the server's engine worker).
    """

    def __init__(
        self,
        engine: StepEngine,
        delay_tokens: int,
        decode: Callable[[list[int]], str],
        *,
        frame_rate: float = 12.5,
        time_offset: float = 0.0,
    ) -> None:
        if engine.batch_size < 1:
            raise SchedulerError(f"engine.batch_size must be >= 1, got {engine.batch_size}")
        if engine.frame_size < 1:
            raise SchedulerError(f"engine.frame_size must be >= 1, got {engine.frame_size}")
        # Validates delay_tokens / frame_rate with the assembler's own messages.
        WordAssembler(delay_tokens, decode, frame_rate, time_offset)
        self.engine = engine
        self.batch_size = engine.batch_size
        self.frame_size = engine.frame_size
        self.delay_tokens = delay_tokens
        self.frame_rate = float(frame_rate)
        self.sample_rate = self.frame_size * self.frame_rate
        self.time_offset = float(time_offset)
        self.step_count = 0  # engine steps run so far: Step.step_idx
        self.last_engine_seconds = 0.0  # wall time of the last engine step alone (both halves)
        self._unsettled = False  # the last engine step's second half has not run yet
        self._decode = decode
        self._streams: dict[Hashable, _Stream] = {}
        self._free: list[int] = list(range(self.batch_size))  # heap: lowest free slot first
        # Shared read-only zeros: padding is queued as views of it, never allocated per stream.
        self._silence = np.zeros(self.frame_size * (delay_tokens + 2), dtype=np.float32)
        self._silence.setflags(write=False)

    # ----------------------------------------------------------------------------- slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_slots(self) -> int:
        return self.batch_size - len(self._free)

    def __contains__(self, stream_id: Hashable) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def admit(self, stream_id: Hashable, *, time_offset: float | None = None) -> bool:
        """Give the stream the lowest free slot; False when every slot is taken."""
        if stream_id in self._streams:
            raise StreamStateError(f"stream {stream_id!r} is already admitted")
        if not self._free:
            return False
        offset = self.time_offset if time_offset is None else float(time_offset)
        assembler = WordAssembler(self.delay_tokens, self._decode, self.frame_rate, offset)
        slot = heapq.heappop(self._free)
        self._streams[stream_id] = _Stream(stream_id, slot, assembler)
        return True

    # ------------------------------------------------------------------------- requests

    def feed(self, stream_id: Hashable, pcm: np.ndarray | Sequence[float]) -> None:
        """Queue mono float samples (any length) at the model's sample rate."""
        stream = self._open(stream_id, "feed")
        try:
            samples = np.array(pcm, dtype=np.float32)  # a copy: the caller may reuse its buffer
        except (TypeError, ValueError) as exc:
            raise SchedulerError(f"stream {stream_id!r}: pcm is not numeric audio: {exc}") from exc
        if samples.ndim != 1:
            raise SchedulerError(
                f"stream {stream_id!r}: pcm must be 1-D mono samples, got shape {samples.shape}"
            )
        if not np.isfinite(samples).all():
            raise SchedulerError(f"stream {stream_id!r}: pcm contains NaN or infinite samples")
        if samples.size:
            stream.queue.push(samples)
            stream.timeline += samples.size
            stream.audio_end = stream.timeline
            stream.unpadded = True

    def marker(self, stream_id: Hashable, marker_id: int) -> None:
        """Echo ``Marker(marker_id)`` once everything fed so far plus D frames is processed."""
        stream = self._open(stream_id, "send a marker to")
        try:
            marker_id = operator.index(marker_id)
        except TypeError:
            raise SchedulerError(
                f"stream {stream_id!r}: marker id must be an integer, got {marker_id!r}"
            ) from None
        queued_frames = -(-stream.queue.samples // self.frame_size)  # a partial frame counts
        target = stream.steps + queued_frames + self.delay_tokens
        self._add_milestone(stream, target, Marker(marker_id))

    def flush(self, stream_id: Hashable, flush_id: int | None = None) -> None:
        """End of utterance: pad with silence so every word spoken so far comes out.

        Once the padding is processed the pending word is emitted even if the model has not
        delimited it, and the last word gets its EndWord (``WordAssembler.finish``) at the point
        where the audio stopped; then ``Flushed(flush_id)`` follows, when an id is given (also
        when there was nothing new to pad: it comes once the queued audio is processed). The
        stream stays open; later audio follows the padding.
        """
        stream = self._open(stream_id, "flush")
        if flush_id is not None:
            try:
                flush_id = operator.index(flush_id)
            except TypeError:
                raise SchedulerError(
                    f"stream {stream_id!r}: flush id must be an integer, got {flush_id!r}"
                ) from None
        end_time = self._audio_end_time(stream) if self._pad(stream) else None
        if end_time is None and flush_id is None:
            return
        if not stream.queue.samples:  # nothing left to transcribe: answer with the next tick
            stream.outbox.append(Flushed(flush_id))
            return
        queued_frames = -(-stream.queue.samples // self.frame_size)
        self._add_milestone(stream, stream.steps + queued_frames, _FlushMark(end_time, flush_id))

    def close(self, stream_id: Hashable) -> None:
        """Finish the stream: pad, transcribe to the end, then emit the last words and Closed.

        The slot is freed by the tick that emits ``Closed``. Further requests raise.
        """
        stream = self._open(stream_id, "close")
        self._pad(stream)
        stream.end_time = self._audio_end_time(stream)
        stream.move_to(StreamState.CLOSING)

    def reset(self, stream_id: Hashable) -> None:
        """Restart the stream from scratch in its slot: queued audio is dropped, the model state
        is reset on its next step, timestamps restart at 0. Pending markers and flushes are
        answered at once (the audio they waited for is gone), then ``Restarted``."""
        stream = self._open(stream_id, "reset")
        stream.queue.clear()
        stream.outbox.extend(self._answers(stream.milestones))
        stream.outbox.append(Restarted())
        stream.milestones.clear()
        stream.assembler.reset()
        stream.needs_reset = True
        stream.steps = 0
        stream.timeline = 0
        stream.audio_end = 0
        stream.unpadded = False

    def remove(self, stream_id: Hashable) -> None:
        """Abrupt disconnect: drop the stream and everything queued for it, free its slot now."""
        stream = self._get(stream_id)
        self._release(stream)

    # ----------------------------------------------------------------------------- state

    def state(self, stream_id: Hashable) -> StreamState:
        return self._get(stream_id).state

    def slot(self, stream_id: Hashable) -> int:
        return self._get(stream_id).slot

    def steps(self, stream_id: Hashable) -> int:
        """Frames of this stream the model has processed since admission or the last reset."""
        return self._get(stream_id).steps

    def buffered_samples(self, stream_id: Hashable) -> int:
        """Samples queued for this stream and not yet processed (padding included)."""
        return self._get(stream_id).queue.samples

    def has_work(self) -> bool:
        """Whether ``tick`` would do anything (run the engine or deliver events)."""
        return any(
            s.queue.samples >= self.frame_size or s.outbox or self._drained(s)
            for s in self._streams.values()
        )

    # ------------------------------------------------------------------------------ tick

    def tick(self) -> dict[Hashable, list[Event]]:
        """Schedule one frame per ready stream, run one engine step, route the results."""
        events: dict[Hashable, list[Event]] = {}
        for stream in self._streams.values():
            if stream.outbox:
                events[stream.id] = stream.outbox
                stream.outbox = []

        ready = [s for s in self._streams.values() if s.queue.samples >= self.frame_size]
        if ready:
            self._run(ready, events)

        for stream in [s for s in self._streams.values() if self._drained(s)]:
            out = events.setdefault(stream.id, [])
            out.extend(stream.assembler.finish(stream.end_time))
            out.extend(self._answers(stream.milestones))
            out.append(Closed(stream.steps))
            self._release(stream)
        return events

    def settle(self) -> float:
        """Finish the last tick's engine step (its Mimi half, which changes none of the events
        ``tick`` returned); returns the seconds it took, also added to
        ``last_engine_seconds``."""
        if not self._unsettled:
            return 0.0
        self._unsettled = False
        start = time.perf_counter()
        self.engine.end_step()
        seconds = time.perf_counter() - start
        self.last_engine_seconds += seconds
        return seconds

    def _compact(self) -> float:
        """Keep the used slots packed: the stream in the highest used slot moves to the lowest
        free slot if that is below it, at most one per step. An engine step computes the
        slots up to the last active one, so a few sessions left high after a busy spell
        would otherwise cost the work of every slot below them. Returns the seconds taken."""
        if not self._free or self._free[0] >= len(self._streams):
            return 0.0  # every slot below the lowest free one is used: already packed
        top = max(self._streams.values(), key=lambda s: s.slot)
        if self._free[0] > top.slot:
            return 0.0
        start = time.perf_counter()
        self.settle()
        dst = heapq.heapreplace(self._free, top.slot)
        if not top.needs_reset:  # a stream that has not stepped yet has no state to carry
            self.engine.move_slot(top.slot, dst)
        top.slot = dst
        return time.perf_counter() - start

    def _run(self, ready: list[_Stream], events: dict[Hashable, list[Event]]) -> None:
        moving = self._compact()
        B, F = self.batch_size, self.frame_size
        pcm = np.zeros((B, F), dtype=np.float32)  # fresh each step: the engine may hold it
        slots = np.fromiter((s.slot for s in ready), dtype=np.intp, count=len(ready))
        resets = np.fromiter((s.needs_reset for s in ready), dtype=bool, count=len(ready))
        for stream in ready:
            stream.queue.pop_into(pcm[stream.slot])
            stream.needs_reset = False
        active = np.zeros(B, dtype=bool)
        active[slots] = True
        reset = np.zeros(B, dtype=bool)
        reset[slots[resets]] = True

        start = time.perf_counter()
        output = self.engine.begin_step(pcm, active, reset)
        self.last_engine_seconds = moving + time.perf_counter() - start
        self._unsettled = True
        if len(output.tokens) != B or (self.engine.has_vad and len(output.prs) != B):
            raise SchedulerError(
                f"engine returned {len(output.tokens)} tokens and {len(output.prs)} prs "
                f"for a batch of {B} slots"
            )
        step_idx = self.step_count
        self.step_count += 1

        for stream in ready:
            out = events.setdefault(stream.id, [])
            if self.engine.has_vad:
                prs = tuple(float(p) for p in output.prs[stream.slot])
                out.append(Step(step_idx, prs, stream.queue.samples))
            out.extend(stream.assembler.push(int(output.tokens[stream.slot])))
            stream.steps += 1
            reached = 0
            for target, milestone in stream.milestones:
                if target > stream.steps:
                    break
                reached += 1
                if isinstance(milestone, Marker):
                    out.append(milestone)
                    continue
                if milestone.end_time is not None:
                    out.extend(stream.assembler.finish(milestone.end_time))
                if milestone.flush_id is not None:
                    out.append(Flushed(milestone.flush_id))
            if reached:
                del stream.milestones[:reached]

    # --------------------------------------------------------------------------- helpers

    def _get(self, stream_id: Hashable) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise UnknownStreamError(
                f"unknown stream {stream_id!r} (never admitted, or already closed or removed)"
            ) from None

    def _open(self, stream_id: Hashable, action: str) -> _Stream:
        stream = self._get(stream_id)
        if stream.state is not StreamState.OPEN:
            raise StreamStateError(
                f"cannot {action} stream {stream_id!r}: it is {stream.state.value}"
            )
        return stream

    @staticmethod
    def _add_milestone(stream: _Stream, target: int, milestone: Marker | _FlushMark) -> None:
        """Keep milestones in target order; equal targets stay in request order."""
        bisect.insort_right(stream.milestones, (target, milestone), key=operator.itemgetter(0))

    @staticmethod
    def _answers(milestones: list[tuple[int, Marker | _FlushMark]]) -> list[Event]:
        """What pending milestones answer when their audio will never come (reset, close)."""
        out: list[Event] = []
        for _, milestone in milestones:
            if isinstance(milestone, Marker):
                out.append(milestone)
            elif milestone.flush_id is not None:
                out.append(Flushed(milestone.flush_id))
        return out

    def _drained(self, stream: _Stream) -> bool:
        return stream.state is StreamState.CLOSING and stream.queue.samples == 0

    def _audio_end_time(self, stream: _Stream) -> float:
        """Where the stream's last audio ended, in seconds on the clock of its events."""
        return stream.audio_end / self.sample_rate - stream.assembler.time_offset

    def _pad(self, stream: _Stream) -> bool:
        """Queue silence after the audio fed since the last padding: zeros to the end of the
        partial frame, then D + 1 frames, enough for the WORD/PAD token that ends the last word
        to come out. Returns False (and queues nothing) if no audio came since the last pad."""
        if not stream.unpadded:
            return False
        to_frame = -stream.queue.samples % self.frame_size  # zeros completing the partial frame
        pad = to_frame + (self.delay_tokens + 1) * self.frame_size
        stream.queue.push(self._silence[:pad])
        stream.timeline += pad
        stream.unpadded = False
        return True

    def _release(self, stream: _Stream) -> None:
        stream.move_to(StreamState.CLOSED)
        del self._streams[stream.id]
        heapq.heappush(self._free, stream.slot)
