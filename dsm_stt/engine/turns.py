"""Turn detection from the model's own VAD heads: a stream's Step / Word events → when speech
started and when the speaker's turn ended.

Owns ``TurnConfig`` (the settings, with the two OpenAI-style presets ``server_vad`` and
``semantic_vad``), ``TurnDetector`` (one stream's state machine) and its two events,
``SpeechStarted`` and ``EndOfTurn``. It sees the events the scheduler produces for one stream,
in order, and nothing else: no audio, no tensors, no clock but the stream's own steps. Pure
Python.

What the heads say (spec §2.6, §4.6): the stt-1b ``-candle`` checkpoint has four extra heads;
``Step.prs[i]`` is the probability that no word is added to the transcript over the next
0.5, 1, 2 and 3 s (``HEAD_HORIZONS``). Kyutai's own clients end a turn when ``prs[2]`` goes over
0.5 (their scripts) or 0.6 (Unmute, which also ignores the first 12 steps, and starts the
user's turn at the first word).

How this detector uses them:

* **Speech starts** at the first non-empty ``Word``, or earlier when the shortest head says a
  word is coming (``1 − prs[0] ≥ threshold``) on ``START_STEPS`` steps in a row (one frame's
  flicker starts nothing), whichever comes first. The first ``ignore_steps`` steps of a stream
  are not trusted for that (Unmute's 12).
* **The turn ends** when the pause head ``head`` reaches ``threshold`` and stays there for
  ``hold`` seconds of steps (a new word restarts the hold), or, with ``max_silence``, when no
  word came out for that long, whatever the heads say.
* Words arrive the text delay after their audio, so the last words of a turn usually come out
  after its end of turn: words whose ``start_time`` is before ``EndOfTurn.time`` belong to the
  turn that ended (and never start a new one). A caller cutting segments at ends of turn uses
  that rule.

Times are seconds on the clock of the stream's events (``Word.start_time``): the detector
counts the stream's steps (one ``Step`` per frame), so ``time_offset`` must be the one the
stream's words were stamped with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dsm_stt.engine.events import Step, Word

HEAD_HORIZONS = (0.5, 1.0, 2.0, 3.0)
"""Seconds of pause each VAD head of stt-1b predicts, by head index (spec §2.6)."""
START_HEAD = 0  # the shortest horizon: "a word is coming within 0.5 s" starts speech
START_STEPS = 3  # ... on this many steps in a row (240 ms, about Silero VAD's shortest speech)
EAGERNESS = ("low", "medium", "high", "auto")

# semantic_vad: eagerness → (pause head, maximum silence in seconds). ``auto`` is ``medium``,
# as OpenAI defines it; the maximum silences are OpenAI's (8, 4 and 2 s).
_SEMANTIC = {"low": (3, 8.0), "medium": (2, 4.0), "high": (1, 2.0), "auto": (2, 4.0)}


@dataclass(frozen=True)
class TurnConfig:
    """How a ``TurnDetector`` decides.

    ``head``: the VAD head whose pause probability ends a turn (``HEAD_HORIZONS[head]`` is the
    pause it predicts). ``threshold``: how sure the model must be of each change — that a word
    is coming (``1 − prs[0]``) to start speech, that the pause will last (``prs[head]``) to end
    the turn. ``hold``: seconds the pause prediction must stay at or over the threshold.
    ``max_silence``: seconds without a new word after which the turn ends anyway (None: never).
    ``prefix_padding``: seconds of audio before the detected start that the turn includes
    (``SpeechStarted.time``). ``ignore_steps``: steps at the start of a stream whose
    probabilities are not used.
    """

    head: int = 2
    threshold: float = 0.5
    hold: float = 0.0
    max_silence: float | None = None
    prefix_padding: float = 0.0
    ignore_steps: int = 12

    def __post_init__(self) -> None:
        if isinstance(self.head, bool) or not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"head must be an integer >= 0, got {self.head!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not self.hold >= 0.0 or math.isinf(self.hold):
            raise ValueError(f"hold must be a finite number of seconds >= 0, got {self.hold!r}")
        if self.max_silence is not None and not 0.0 < self.max_silence < math.inf:
            raise ValueError(f"max_silence must be > 0 seconds or None, got {self.max_silence!r}")
        if not 0.0 <= self.prefix_padding < math.inf:
            raise ValueError(f"prefix_padding must be >= 0 seconds, got {self.prefix_padding!r}")
        if self.ignore_steps < 0:
            raise ValueError(f"ignore_steps must be >= 0, got {self.ignore_steps!r}")

    @classmethod
    def server_vad(
        cls,
        threshold: float = 0.5,
        prefix_padding_ms: int = 300,
        silence_duration_ms: int = 500,
    ) -> TurnConfig:
        """OpenAI's ``server_vad`` fields on the heads: the pause head is the longest whose
        horizon fits in ``silence_duration_ms`` (head 0 below 0.5 s), and the rest of the
        duration, if any, is a ``hold`` (1500 ms: head 1 held 0.5 s; 5000 ms: head 3 held 2 s)."""
        if not silence_duration_ms >= 0:
            raise ValueError(f"silence_duration_ms must be >= 0, got {silence_duration_ms!r}")
        if not prefix_padding_ms >= 0:
            raise ValueError(f"prefix_padding_ms must be >= 0, got {prefix_padding_ms!r}")
        silence = silence_duration_ms / 1000
        fitting = [i for i, horizon in enumerate(HEAD_HORIZONS) if horizon <= silence]
        head = fitting[-1] if fitting else 0
        return cls(
            head=head,
            threshold=threshold,
            hold=max(0.0, silence - HEAD_HORIZONS[head]),
            prefix_padding=prefix_padding_ms / 1000,
        )

    @classmethod
    def semantic_vad(cls, eagerness: str = "auto") -> TurnConfig:
        """OpenAI's ``semantic_vad``: ``eagerness`` picks how long a pause the model must
        foresee — ``high`` 1 s (head 1), ``medium`` and ``auto`` 2 s (head 2, Kyutai's choice),
        ``low`` 3 s (head 3) — at threshold 0.5, with OpenAI's maximum waits of 2, 4 and 8 s."""
        if eagerness not in _SEMANTIC:
            raise ValueError(f"eagerness must be one of {', '.join(EAGERNESS)}, got {eagerness!r}")
        head, max_silence = _SEMANTIC[eagerness]
        return cls(head=head, threshold=0.5, max_silence=max_silence)

    @property
    def heads_needed(self) -> int:
        """How many VAD heads the model must have for this configuration."""
        return max(self.head, START_HEAD) + 1


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The speaker started a turn. ``step``: the ``Step.step_idx`` at which it was noticed (the
    last one seen, when a word noticed it); ``time``: seconds where the turn's audio starts,
    ``prefix_padding`` before the detected onset, never before the previous turn's end."""

    step: int
    time: float


@dataclass(frozen=True, slots=True)
class EndOfTurn:
    """The speaker's turn ended. ``step``: the ``Step.step_idx`` that decided it; ``time``:
    seconds of the stream's audio the model had heard then (the end of that step's frame);
    ``probability``: the pause probability of ``head`` at that step."""

    step: int
    time: float
    probability: float
    head: int


TurnEvent = SpeechStarted | EndOfTurn


class TurnDetector:
    """One stream's turns. Feed it the stream's events in order with ``push``; it returns the
    ``SpeechStarted`` / ``EndOfTurn`` events they complete. Every ``SpeechStarted`` is followed
    by one ``EndOfTurn`` before the next ``SpeechStarted``.

    ``frame_rate``: the model's steps per second; ``time_offset``: subtracted from step times,
    as the stream's words have it (``WordAssembler.time_offset``).
    """

    def __init__(
        self, config: TurnConfig, frame_rate: float = 12.5, time_offset: float = 0.0
    ) -> None:
        if not frame_rate > 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate!r}")
        self.config = config
        self.frame_rate = float(frame_rate)
        self.time_offset = float(time_offset)
        self.reset()

    def reset(self) -> None:
        """A new stream (or the same one restarted): step 0, no turn, nothing ended yet."""
        self.steps = 0  # Steps seen: the stream's clock
        self.speaking = False
        self._step_idx = 0  # the last Step.step_idx seen
        self._ended_at = -math.inf  # time of the last end of turn
        self._above = 0  # consecutive steps with the pause prediction at or over the threshold
        self._below = 0  # consecutive steps, out of a turn, saying that a word is coming
        self._last_word = 0.0  # time the last word of this turn came out (or the turn began)

    def configure(self, config: TurnConfig) -> None:
        """New settings from the next event on; a turn in progress goes on."""
        self.config = config
        self._above = 0

    @property
    def now(self) -> float:
        """Seconds of the stream's audio the model has heard (the end of the last frame)."""
        return self.steps / self.frame_rate - self.time_offset

    def end_turn(self, time: float) -> None:
        """The caller ended the turn itself at ``time`` (e.g. a client's manual commit): back to
        waiting for speech; words that started before ``time`` belong to the ended turn."""
        self.speaking = False
        self._above = self._below = 0
        self._ended_at = max(self._ended_at, time)

    def push(self, event: object) -> list[TurnEvent]:
        """Account for one of the stream's events (``Step`` and ``Word`` matter; the rest is
        ignored); return the turn events it completes."""
        if isinstance(event, Step):
            return self._step(event)
        if isinstance(event, Word) and event.text.strip():
            return self._word(event)
        return []

    def _step(self, step: Step) -> list[TurnEvent]:
        cfg = self.config
        self.steps += 1
        self._step_idx = step.step_idx
        if len(step.prs) < cfg.heads_needed:
            raise ValueError(
                f"turn detection on head {cfg.head} needs {cfg.heads_needed} VAD heads; "
                f"this step has {len(step.prs)}"
            )
        now = self.now
        if self.steps <= cfg.ignore_steps:
            if self.speaking:  # a word started the turn: only the timeout can end it yet
                return self._timeout(step, now)
            return []
        if not self.speaking:
            onset = now - 1 / self.frame_rate  # the start of this step's frame
            if onset >= self._ended_at and 1.0 - step.prs[START_HEAD] >= cfg.threshold:
                self._below += 1
                if self._below >= START_STEPS:
                    return [self._start(onset - (START_STEPS - 1) / self.frame_rate)]
            else:
                self._below = 0
            return []
        probability = float(step.prs[cfg.head])
        if probability >= cfg.threshold:
            self._above += 1
            if self._above > math.ceil(cfg.hold * self.frame_rate - 1e-9):
                return [self._end(step, now, probability)]
        else:
            self._above = 0
        return self._timeout(step, now)

    def _timeout(self, step: Step, now: float) -> list[TurnEvent]:
        limit = self.config.max_silence
        if limit is not None and now - self._last_word >= limit - 1e-9:
            return [self._end(step, now, float(step.prs[self.config.head]))]
        return []

    def _word(self, word: Word) -> list[TurnEvent]:
        if self.speaking:
            self._above = 0  # the speaker is not done: the pause must be foreseen again
            self._last_word = self.now
            return []
        if word.start_time < self._ended_at:
            return []  # a late word of the turn that ended
        return [self._start(word.start_time)]

    def _start(self, onset: float) -> SpeechStarted:
        self.speaking = True
        self._above = self._below = 0
        self._last_word = self.now
        start = max(onset - self.config.prefix_padding, self._ended_at, -self.time_offset)
        return SpeechStarted(self._step_idx, start)

    def _end(self, step: Step, now: float, probability: float) -> EndOfTurn:
        self.speaking = False
        self._above = self._below = 0
        self._ended_at = now
        return EndOfTurn(step.step_idx, now, probability, self.config.head)
