"""What the engine reports: per stream Word, EndWord, Step, Marker, Flushed, Restarted, Closed;
per step StepOutput.

Plain frozen values shared by the engine (which produces them) and the server (which encodes them
for the wire, spec §5.2). They carry seconds and ids, never tensors, and know nothing about
msgpack: the protocol codec owns the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Word:
    """A finished word: its text and the time of the WORD token that preceded it (spec §4.3).

    ``tokens`` are the text-piece ids the text was decoded from (kept for logs and tests).
    """

    text: str
    start_time: float
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class EndWord:
    """The previous Word ended at ``stop_time`` seconds (the start of the next word, spec §4.3)."""

    stop_time: float


@dataclass(frozen=True, slots=True)
class Step:
    """One model step consumed a frame of this stream (only sent by models with VAD heads).

    ``step_idx`` is the scheduler-global step counter, ``prs`` the class-0 probability of each
    VAD head, ``buffered_pcm`` the samples still queued for this stream after the step.
    """

    step_idx: int
    prs: tuple[float, ...]
    buffered_pcm: int


@dataclass(frozen=True, slots=True)
class Marker:
    """Echo of a client marker: all audio sent before it has been transcribed (spec §4.5)."""

    id: int


@dataclass(frozen=True, slots=True)
class Flushed:
    """Answer to a flush: every word of the audio fed before it has been sent."""

    id: int


@dataclass(frozen=True, slots=True)
class Restarted:
    """Answer to a reset: the stream starts again from scratch, its clock back at 0."""


@dataclass(frozen=True, slots=True)
class Closed:
    """Last event of a stream closed with ``Scheduler.close``: its slot is free again.

    ``steps`` is the number of model steps the stream used since its last reset.
    """

    steps: int


WordEvent = Word | EndWord
Event = Word | EndWord | Step | Marker | Flushed | Restarted | Closed


@dataclass(frozen=True)
class StepOutput:
    """What one engine step returns, as plain Python values indexed by slot."""

    tokens: list[int]  # [B] next text token per slot (meaningless for inactive slots)
    prs: list[tuple[float, ...]]  # [B] VAD class-0 probabilities; empty tuples without heads
